"""FSDP2 engine: `fully_shard` on every decoder layer, then on the root module.

Sharding per decoder layer makes each layer one all-gather / reduce-scatter unit, so at most a couple of
layers are unsharded at any time; the root call picks up what is left (embeddings, final norm, lm_head).
Parameters become DTensors sharded on dim 0 over the mesh; the optimizer is created afterwards so that it
holds (and keeps its state as) the shards.

Axes: reshard_after_forward true = ZeRO-3, false = ZeRO-2; hsdp = a 2-D (replicate, shard) mesh where
shards are all-gathered inside a group of `shard_size` ranks and gradients are all-reduced across groups;
offload optimizer+params = CPUOffloadPolicy (sharded params, grads and the optimizer step live on the CPU);
param_dtype/reduce_dtype = MixedPrecisionPolicy (the fp32 shards stay the master weights).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from overdrive.parallel.ddp import TorchDistEngine
from overdrive.parallel.distributed import data_parallel_mesh, decoder_layers
from overdrive.parallel.strategy import Strategy
from overdrive.train.engine import OptimizerFactory, Runtime, SchedulerFactory

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def shard_model(model: nn.Module, strategy: Strategy, runtime: Runtime) -> nn.Module:
    """Apply fully_shard per decoder layer and at the root; returns the same (now FSDP) module."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = data_parallel_mesh(strategy, runtime)
    param_dtype = DTYPES[strategy.param_dtype]
    mp_policy = MixedPrecisionPolicy(
        param_dtype=None if param_dtype == torch.float32 else param_dtype,
        reduce_dtype=DTYPES[strategy.reduce_dtype],
    )
    if strategy.offload == "optimizer+params":
        offload: OffloadPolicy = CPUOffloadPolicy(pin_memory=runtime.device.type == "cuda")
    else:
        offload = OffloadPolicy()
        model = model.to(runtime.device)
    options = {
        "mesh": mesh,
        "reshard_after_forward": strategy.reshard_after_forward,
        "mp_policy": mp_policy,
        "offload_policy": offload,
    }
    layers = decoder_layers(model)
    if not layers and runtime.rank == 0:
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


class FSDPEngine(TorchDistEngine):
    """FSDP2 (ZeRO-2/3, HSDP, CPU offload, bf16 mixed precision) behind the TrainEngine protocol."""

    def __init__(
        self,
        model: nn.Module,
        runtime: Runtime,
        strategy: Strategy,
        make_optimizer: OptimizerFactory,
        make_scheduler: SchedulerFactory,
    ) -> None:
        sharded = shard_model(model, strategy, runtime)
        super().__init__(sharded, sharded, runtime, strategy, make_optimizer, make_scheduler)

    @contextlib.contextmanager
    def _sync(self, enabled: bool) -> Iterator[None]:
        # Without sync each rank accumulates unsharded gradients locally; the last micro-batch reduce-scatters
        # the accumulated sum once.
        self.model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def sync_gradients(self, enabled: bool) -> contextlib.AbstractContextManager[None]:
        return self._sync(enabled)

    def sharding_report(self) -> dict[str, object]:
        """Facts for tests and logs: whether parameters are DTensors, on which mesh, where they live."""
        from torch.distributed.tensor import DTensor

        params = list(self.module.parameters())
        first = params[0]
        return {
            "all_dtensor": all(isinstance(p, DTensor) for p in params),
            "mesh_shape": list(first.device_mesh.shape) if isinstance(first, DTensor) else None,
            "placements": [str(p) for p in first.placements] if isinstance(first, DTensor) else None,
            "param_device": first.to_local().device.type if isinstance(first, DTensor) else first.device.type,
            "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
            "numel": sum(p.numel() for p in params),
            **_layer_group_facts((decoder_layers(self.module) or [self.module])[0]),
        }


def _layer_group_facts(layer: nn.Module) -> dict[str, object]:
    """FSDP2's own record of how a layer is sharded (private attributes: best effort, for tests and logs)."""
    try:
        group = layer._get_fsdp_state()._fsdp_param_group
        return {
            "reshard_after_forward": group.post_forward_mesh_info is not None,
            "offload_to_cpu": all(p.offload_to_cpu for p in group.fsdp_params),
        }
    except AttributeError:
        return {}
