"""Activation checkpointing: recompute decoder layers in backward instead of keeping their activations.

Two granularities, both per decoder layer (`decoder_layers`):

- full: the layer keeps only its inputs; backward re-runs the whole layer forward.
- selective (op-level): inside the layer, the outputs of the expensive ops (matmuls, attention, collectives)
  are kept and only the cheap element-wise ops (norms, RoPE, activations, residual adds) are recomputed, through
  torch's selective-checkpoint policy (`create_selective_checkpoint_contexts`). Backward then re-runs no matmul,
  so it costs little compute, while the many element-wise intermediates (several per matmul) are not stored.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.utils.checkpoint
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from overdrive.core.layers import decoder_layers

Granularity = Literal["full", "selective"]

# Ops whose outputs selective recompute keeps: every matmul (nn.Linear lowers to mm/addmm, batched products to
# bmm/baddbmm; fp8 linears to _scaled_mm), every fused attention kernel, and the tensor-parallel collectives
# (recomputing them would repeat communication). Everything else is recomputed.
_SAVED_ATEN = (
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "_scaled_mm",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
)
_SAVED_COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_to_all_single")


@functools.cache
def saved_ops() -> frozenset[Any]:
    """The op packets (`torch.ops.aten.mm`, ...) whose outputs selective recompute keeps."""
    packets = [getattr(torch.ops.aten, name, None) for name in _SAVED_ATEN]
    try:
        importlib.import_module("torch.distributed")  # registers the functional collectives
        packets += [getattr(torch.ops._c10d_functional, name, None) for name in _SAVED_COLLECTIVES]
    except (ImportError, AttributeError, RuntimeError):
        pass
    return frozenset(p for p in packets if p is not None)


def selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Keep matmul/attention/collective outputs, recompute the rest (torch's selective-checkpoint policy)."""
    if getattr(op, "overloadpacket", op) in saved_ops():
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def selective_context() -> tuple[Any, Any]:
    """The (forward, recompute) context pair `torch.utils.checkpoint.checkpoint(context_fn=...)` expects."""
    return create_selective_checkpoint_contexts(selective_policy)


def checkpoint_wrapper(inner: Callable[..., Any], granularity: Granularity = "full") -> Callable[..., Any]:
    """`inner` (a layer's bound forward) under non-reentrant torch checkpointing of the given granularity."""
    extra: dict[str, Any] = {"context_fn": selective_context} if granularity == "selective" else {}

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False, **extra, **kwargs)

    checkpointed.recompute = granularity  # type: ignore[attr-defined]  # what a layer's forward does, for reports
    return checkpointed


def apply_activation_checkpointing(
    model: nn.Module, every: int = 1, granularity: Granularity = "full"
) -> int:
    """Recompute decoder layers 0, every, 2*every, ... in backward; returns how many layers were wrapped.

    The layer's `forward` is replaced on the instance (non-reentrant torch checkpoint), so parameter names,
    state dicts and FSDP/DeepSpeed hooks on `__call__` are unchanged. `granularity="selective"` keeps the
    matmul outputs and recomputes only the element-wise ops (see the module docstring).
    """
    count = 0
    for index, layer in enumerate(decoder_layers(model)):
        if index % every == 0:
            layer.forward = checkpoint_wrapper(layer.forward, granularity)
            count += 1
    if count and hasattr(model, "config"):
        model.config.use_cache = False  # a KV cache is useless in training and conflicts with recompute
    return count


def apply_selective_checkpointing(model: nn.Module, every: int = 1) -> int:
    """Op-level recompute in decoder layers 0, every, ...: matmul outputs kept, element-wise ops recomputed."""
    return apply_activation_checkpointing(model, every, granularity="selective")
