"""The single-process checkpoint format (model.safetensors + optimizer.pt) read into any parallel layout.

A process without a process group saves plain files; torch numbers the optimizer's parameters by position, so
the file also records each position's parameter name (`param_names`). With the names, the state loads by name
into sharded (FSDP2, tensor-parallel) or pipelined modules: one process -> N ranks, or -> pipeline stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from overdrive.errors import UsageError
from overdrive.parallel.materialize import write_full


def optimizer_param_names(optimizer: torch.optim.Optimizer, module: nn.Module) -> list[str]:
    """The parameter name of each optimizer position, in the order `optimizer.state_dict()` numbers them."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names.get(id(p), f"<unnamed {i}>") for i, p in enumerate(_params(optimizer))]


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def named_optimizer_state(saved: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """torch's position-keyed optimizer state as DCP's flat per-name form (`state.<name>.<key>`, ...)."""
    flat: dict[str, Any] = {}
    for index, state in saved["state"].items():
        for key, value in state.items():
            flat[f"state.{names[int(index)]}.{key}"] = value
    for group in saved["param_groups"]:
        for index in group["params"]:
            for key, value in group.items():
                if key != "params":
                    flat[f"param_groups.{names[int(index)]}.{key}"] = value
    return flat


def load_local_into(
    pairs: list[tuple[nn.Module, torch.optim.Optimizer]], schedulers: list[Any], directory: Path
) -> None:
    """Load a single-process checkpoint into (module, optimizer) pairs of any layout, by parameter name."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    state = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
    names = state.get("param_names")
    if names is None:
        raise UsageError(
            f"checkpoint {directory} was written by one process before parameter names were recorded; "
            "resume it on one process (the strategy it was written with)"
        )
    weights = load_file(str(directory / "model.safetensors"))
    optim = named_optimizer_state(state["optimizer"], names)
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    for module, optimizer in pairs:
        _fill_tied(weights, module)
        own_model, own_optim = get_state_dict(module, optimizer, options=options)  # this layout's shards
        missing = [k for k in own_model if k not in weights] + [k for k in own_optim if k not in optim]
        if missing:
            raise UsageError(
                f"checkpoint {directory} has no {missing[0]}; it was written for another model or optimizer"
            )
        for key, target in own_model.items():
            write_full(target, weights[key], key)  # this rank's part of each full tensor
        for key, target in own_optim.items():
            if isinstance(target, torch.Tensor):
                write_full(target, optim[key].reshape(target.shape), key)
            else:
                own_optim[key] = optim[key]
        set_state_dict(module, optimizer, model_state_dict=own_model, optim_state_dict=own_optim, options=options)
    for scheduler in schedulers:
        scheduler.load_state_dict(state["scheduler"])


def _fill_tied(weights: dict[str, torch.Tensor], module: nn.Module) -> None:
    """safetensors stores a tied tensor once, under one of its names: make it readable under all of them
    (a pipeline stage may hold only the other name)."""
    groups: list[list[str]] = []
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in module.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(tensor), []).append(name)
    groups.extend(by_tensor.values())
    tied = getattr(module, "_tied_weights_keys", None)
    if isinstance(tied, dict) and getattr(getattr(module, "config", None), "tie_word_embeddings", False):
        groups.extend([target, source] for target, source in tied.items())
    for names in groups:
        stored = next((n for n in names if n in weights), None)
        if stored is not None:
            for name in names:
                weights.setdefault(name, weights[stored])
