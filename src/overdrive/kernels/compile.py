"""Regional compilation: ``torch.compile`` each decoder block in place instead of the whole model.

Why: all decoder blocks of a model share one class and (with dynamo's default inlining of
``nn.Module``s) one compiled graph, so compile time is that of a single block instead of the whole
model, the blocks stay individually checkpointable/wrappable (FSDP, activation checkpointing), and
graph breaks elsewhere (loss, generation utilities, data-dependent Python) cannot poison the block
graphs. ``nn.Module.compile`` is used, so parameter names / ``state_dict`` keys are unchanged (no
``_orig_mod.`` prefix).
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

__all__ = ["compile_model", "compile_regions", "find_decoder_layers"]

_KNOWN_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers")


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The ModuleList of repeated decoder blocks, found generically.

    Tries the usual attribute paths (``model.layers`` for Llama-likes), then falls back to the
    homogeneous ModuleList holding the most parameters (works through PEFT/DDP wrappers).
    """
    for path in _KNOWN_PATHS:
        found = _get_path(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    best: nn.ModuleList | None = None
    best_params = 0
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        n = sum(p.numel() for p in module.parameters())
        if n > best_params:
            best, best_params = module, n
    return best


def compile_regions(model: nn.Module, **compile_kwargs: Any) -> int:
    """``torch.compile`` every decoder block of ``model`` in place; returns how many were compiled.

    ``compile_kwargs`` go to ``torch.compile`` (``mode``, ``dynamic``, ``backend``, ``fullgraph``...).
    Already-compiled blocks are skipped, so calling this twice is harmless.
    """
    layers = find_decoder_layers(model)
    if layers is None:
        warnings.warn(
            f"overdrive: no decoder-layer ModuleList found in {type(model).__name__}; nothing compiled.",
            stacklevel=2,
        )
        return 0
    count = 0
    for layer in layers:
        if getattr(layer, "_compiled_call_impl", None) is None:
            layer.compile(**compile_kwargs)
            count += 1
    return count


def compile_model(model: nn.Module, regional: bool = True, **compile_kwargs: Any) -> int:
    """Regional compile (default) or whole-model ``model.compile()``; returns the number of compiled modules."""
    if regional:
        return compile_regions(model, **compile_kwargs)
    if getattr(model, "_compiled_call_impl", None) is None:
        model.compile(**compile_kwargs)
    return 1
