"""The one decoder-layer finder: the unit of sharding, recompute, compile, kernels and pipeline stages."""

from __future__ import annotations

from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a causal LM, in order.

    HF models name their block classes in `_no_split_modules`; without that, the ModuleList of same-class
    modules holding the most parameters is taken (a list of many tiny heads is not the model's blocks).
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    if names:
        found = [m for m in model.modules() if type(m).__name__ in names]
        if found:
            return found
    best: list[nn.Module] = []
    best_params = 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(c) for c in module}) == 1:
            params = sum(p.numel() for p in module.parameters())
            if params > best_params:
                best, best_params = list(module), params
    return best
