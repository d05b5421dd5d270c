"""Activation checkpointing: recompute decoder layers in backward instead of keeping their activations."""

from __future__ import annotations

import functools
from typing import Any

import torch.utils.checkpoint
from torch import nn

from overdrive.core.layers import decoder_layers


def apply_activation_checkpointing(model: nn.Module, every: int = 1) -> int:
    """Recompute decoder layers 0, every, 2*every, ... in backward; returns how many layers were wrapped.

    The layer's `forward` is replaced on the instance (non-reentrant torch checkpoint), so parameter names,
    state dicts and FSDP/DeepSpeed hooks on `__call__` are unchanged.
    """

    def checkpointed(inner: Any, *args: Any, **kwargs: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False, **kwargs)

    count = 0
    for index, layer in enumerate(decoder_layers(model)):
        if index % every == 0:
            layer.forward = functools.partial(checkpointed, layer.forward)
            count += 1
    if count and hasattr(model, "config"):
        model.config.use_cache = False  # a KV cache is useless in training and conflicts with recompute
    return count
