"""Data parallelism as a transform of the model: DDP, FSDP2 (ZeRO-2/3, offload, mixed precision) or HSDP.

Applied last (after tensor parallelism, recompute and compile) because it owns parameter storage and its hooks
must run around everything else. FSDP2 shards each decoder layer, then the root (embeddings, final norm,
lm_head): each layer is one all-gather / reduce-scatter unit. On a mesh that also has a tensor dimension, FSDP2
shards the tensor-parallel DTensors again over the data-parallel dimension (2-D parameters).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from torch import nn

from overdrive.core.layers import decoder_layers
from overdrive.core.runtime import Runtime
from overdrive.parallel.strategy import Strategy

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GradientSync = Callable[[bool], contextlib.AbstractContextManager[None]]


def apply_data_parallel(
    model: nn.Module, strategy: Strategy, runtime: Runtime
) -> tuple[nn.Module, GradientSync]:
    """(the module the loop calls, a context that skips the gradient reduction for accumulation steps)."""
    if strategy.data_parallel in ("fsdp", "hsdp"):
        sharded = apply_fsdp(model, strategy, runtime)
        return sharded, lambda enabled: fsdp_sync(sharded, enabled)
    if strategy.data_parallel == "ddp":
        wrapper = apply_ddp(model, strategy, runtime)
        return wrapper, lambda enabled: contextlib.nullcontext() if enabled else wrapper.no_sync()
    return model.to(runtime.device), lambda enabled: contextlib.nullcontext()


def apply_ddp(model: nn.Module, strategy: Strategy, runtime: Runtime) -> nn.Module:
    """torch DDP over the data-parallel ranks; reduce_dtype bf16 installs `bf16_allreduce_hook`."""
    from torch.nn.parallel import DistributedDataParallel

    model = model.to(runtime.device)
    kwargs = {"device_ids": [runtime.device.index]} if runtime.device.type == "cuda" else {}
    wrapper = DistributedDataParallel(model, process_group=runtime.process_group("dp"), **kwargs)
    if strategy.reduce_dtype == "bf16":
        wrapper.register_comm_hook(None, bf16_allreduce_hook)
    return wrapper


def bf16_allreduce_hook(process_group, bucket):
    """DDP communication hook: all-reduce each gradient bucket in bf16, average, write back in its own dtype.

    torch's built-in bf16 hook is NCCL-only; this one works with any backend (gloo reduces bf16 on CPU too).
    """
    import torch.distributed as dist

    group = process_group if process_group is not None else dist.group.WORLD
    compressed = bucket.buffer().to(torch.bfloat16).div_(dist.get_world_size(group))
    future = dist.all_reduce(compressed, group=group, async_op=True).get_future()

    def write_back(done) -> torch.Tensor:
        out = bucket.buffer()
        out.copy_(done.value()[0])
        return out

    return future.then(write_back)


def apply_fsdp(model: nn.Module, strategy: Strategy, runtime: Runtime) -> nn.Module:
    """fully_shard per decoder layer and at the root on the data-parallel mesh; returns the same module."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    assert runtime.mesh is not None, "FSDP needs the device mesh (init_runtime builds it)"
    mesh = runtime.mesh["dp_replicate", "dp_shard"] if strategy.data_parallel == "hsdp" else runtime.dp_mesh
    param_dtype = DTYPES[strategy.param_dtype]
    mp_policy = MixedPrecisionPolicy(
        param_dtype=None if param_dtype == torch.float32 else param_dtype,
        reduce_dtype=DTYPES[strategy.reduce_dtype],
    )
    if strategy.offload == "optimizer+params":
        offload: OffloadPolicy = CPUOffloadPolicy(pin_memory=runtime.device.type == "cuda")
    else:
        offload = OffloadPolicy()
        if not on_meta(model):  # a meta model is filled on its device after sharding
            model = model.to(runtime.device)
    options = {
        "mesh": mesh,
        "reshard_after_forward": strategy.resolved_reshard_after_forward,
        "mp_policy": mp_policy,
        "offload_policy": offload,
    }
    layers = decoder_layers(model)
    if not layers and runtime.is_main:
        warnings.warn(_NO_LAYERS.format(name=type(model).__name__), stacklevel=2)
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


# Not an error: FSDP2 shards any module, and the root call alone is a correct (if coarser) unit. A model with
# num_hidden_layers: 0 reaches this, as does a custom model whose blocks we cannot recognise.
_NO_LAYERS = (
    "{name} has no decoder layers to shard one by one; FSDP shards it as a single unit (parameters are "
    "all-gathered together in forward and backward)"
)


def on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


@contextlib.contextmanager
def fsdp_sync(model: nn.Module, enabled: bool):
    """Without sync each rank accumulates unsharded gradients; the last micro-batch reduce-scatters once."""
    model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
