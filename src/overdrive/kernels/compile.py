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

from overdrive.core.layers import decoder_layers

__all__ = ["compile_model", "compile_regions"]


def compile_regions(model: nn.Module, **compile_kwargs: Any) -> int:
    """``torch.compile`` every decoder block of ``model`` in place; returns how many were compiled.

    ``compile_kwargs`` go to ``torch.compile`` (``mode``, ``dynamic``, ``backend``, ``fullgraph``...).
    Already-compiled blocks are skipped, so calling this twice is harmless.
    """
    layers = decoder_layers(model)
    if not layers:
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
