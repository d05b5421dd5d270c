"""Strategies on real engines: DDP, FSDP2 (ZeRO-2/3, HSDP, offload), tensor parallelism, DeepSpeed ZeRO 0-3.

Entry points for the training loop:

    strategy = Strategy.from_name_or_path("fsdp-tp")        # preset name or YAML file
    runtime = init_runtime(strategy)                        # validates, starts the process group and mesh
    engine = build_engine(model, strategy, runtime, make_optimizer, make_scheduler, max_grad_norm, precision)
    save_checkpoint(engine, path, extra) / load_checkpoint(engine, path) / export_hf(path, out)
    shutdown()

`parallelize` applies the model transforms in one fixed order (PARALLELIZE_ORDER); `build_engine` hands the
result to TorchEngine, or the unparallelized model to DeepSpeed, which owns its own wrapper. Importing this
package does not import torch.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from overdrive.errors import UsageError
from overdrive.parallel.strategy import PRESETS, Strategy

if TYPE_CHECKING:
    from torch import nn

    from overdrive.core.engine import OptimizerFactory, SchedulerFactory, TrainEngine
    from overdrive.core.runtime import Runtime
    from overdrive.parallel.adapters import AdapterSpec

__all__ = [
    "PARALLELIZE_ORDER",
    "PRESETS",
    "Strategy",
    "WeightFill",
    "build_engine",
    "export_hf",
    "init_runtime",
    "latest_checkpoint",
    "load_checkpoint",
    "parallelize",
    "save_checkpoint",
    "shutdown",
]

# Why this order: kernels replace module classes, so everything after sees the final layer code; tensor
# parallelism turns weights into DTensors and must see plain modules; recompute wraps whole (parallel) layers;
# compile traces the layer including its recompute; data parallelism (DDP/FSDP2) wraps last because it owns
# parameter storage (FSDP2 shards the tensor-parallel DTensors again) and its hooks run around everything.
PARALLELIZE_ORDER: tuple[str, ...] = (
    "kernels",
    "adapters",  # peft LoRA/DoRA/QLoRA (overdrive.parallel.adapters): kernels stay on the frozen base
    "fp8",  # torchao float8 linears: swaps nn.Linear classes, so before tensor parallelism and compile
    "tensor_parallel",
    "activation_checkpointing",
    "compile",
    "data_parallel",
)

# Fills a parallelized meta model's local shards (overdrive.parallel.materialize): after FSDP2 shards it, before
# DDP or DeepSpeed wrap it (they need real tensors).
WeightFill = Callable[["nn.Module"], None]

_LAZY = {
    "init_runtime": "overdrive.parallel.distributed",
    "shutdown": "overdrive.parallel.distributed",
    "guard": "overdrive.parallel.distributed",
    "save_checkpoint": "overdrive.parallel.checkpoint",
    "load_checkpoint": "overdrive.parallel.checkpoint",
    "latest_checkpoint": "overdrive.parallel.checkpoint",
    "export_hf": "overdrive.parallel.checkpoint",
    "capture_rng_state": "overdrive.parallel.checkpoint",
    "restore_rng_state": "overdrive.parallel.checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'overdrive.parallel' has no attribute {name!r}")


def parallelize(
    model: nn.Module,
    strategy: Strategy,
    runtime: Runtime,
    fill: WeightFill | None = None,
    adapters: AdapterSpec | None = None,
) -> Parallelized:
    """Apply PARALLELIZE_ORDER to `model` in place; every step is one small function in its own module.

    `model` may be on the meta device: `fill` then allocates and fills its local shards, after FSDP2 has
    sharded it (each rank allocates only its shards) or before DDP wraps it.
    """
    from overdrive.parallel.data import apply_data_parallel

    result = Parallelized(module=model)
    if strategy.fp8:
        from overdrive.parallel.fp8 import apply_fp8, check_fp8

        check_fp8(runtime.device, strategy.tensor_parallel)  # one line before anything runs, not mid-step
    if strategy.kernels:
        apply_kernels(model, strategy)
        result.applied.append("kernels")
    if adapters is not None:
        from overdrive.parallel.adapters import apply_adapters

        fill = apply_adapters(model, adapters, fill, runtime)
        result.applied.append("adapters")
    if strategy.fp8:  # swaps nn.Linear classes like the kernels do: before tensor parallelism and compile
        result.notes.append(f"fp8: {apply_fp8(model)} linear layers train in float8 (torchao)")
        result.applied.append("fp8")
    if strategy.tensor_parallel != 1:
        from overdrive.parallel.tensor import apply_tensor_parallel, tp_loss_context

        assert runtime.mesh is not None, "tensor parallelism needs the device mesh (init_runtime builds it)"
        result.notes += apply_tensor_parallel(
            model, runtime.mesh["tp"], sequence_parallel=strategy.sequence_parallel
        )
        result.loss_context = lambda: tp_loss_context(model)
        result.applied.append("tensor_parallel")
    if strategy.activation_checkpointing != "none":
        from overdrive.parallel.recompute import apply_activation_checkpointing, apply_selective_checkpointing

        every = strategy.ac_every if strategy.activation_checkpointing == "every_k" else 1
        if strategy.activation_checkpointing == "selective":
            apply_selective_checkpointing(model)
        else:
            apply_activation_checkpointing(model, every)
        result.applied.append("activation_checkpointing")
    if strategy.activation_offload:
        from overdrive.parallel.offload import with_activation_offload

        result.loss_context = with_activation_offload(result.loss_context, runtime.device)
    skip_compile = None
    if strategy.compile and strategy.tensor_parallel != 1:
        from overdrive.parallel.tensor import compile_compatible_with_tp

        skip_compile = compile_compatible_with_tp(strategy.activation_checkpointing != "none")
        if skip_compile:
            result.notes.append(f"compile skipped: {skip_compile}")
    if strategy.compile and not skip_compile:
        from overdrive.kernels.compile import compile_regions

        compile_regions(model)
        result.applied.append("compile")
    sharded = strategy.data_parallel in ("fsdp", "hsdp")
    if fill is not None and not sharded:
        fill(model)
    result.wrapper, result.gradient_sync = apply_data_parallel(model, strategy, runtime)
    if fill is not None and sharded:
        fill(model)
    if strategy.data_parallel != "none":
        result.applied.append("data_parallel")
    if runtime.rank == 0:
        for note in result.notes:
            print(f"overdrive: note: {note}", file=sys.stderr)
    return result


@dataclasses.dataclass
class Parallelized:
    """What `parallelize` produced: the module the loop calls, the HF module, and the hooks the engine needs."""

    module: nn.Module
    wrapper: Any = None  # DDP wrapper, or `module` itself
    gradient_sync: Any = None
    loss_context: Any = None
    applied: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


def apply_kernels(model: nn.Module, strategy: Strategy) -> None:
    """overdrive's fused kernels; under tensor parallelism only those that are exact on DTensor shards."""
    try:
        from overdrive.patches import patch_model
    except ImportError as exc:
        raise UsageError(f"strategy kernels: true but overdrive's kernels are unavailable ({exc})") from None
    features: dict[str, bool] = {}
    if strategy.tensor_parallel != 1:
        from overdrive.parallel.tensor import kernels_compatible_with_tp

        features = {name: reason is None for name, reason in kernels_compatible_with_tp().items()}
    patch_model(model, **features)


def build_engine(
    model: nn.Module,
    strategy: Strategy,
    runtime: Runtime,
    make_optimizer: OptimizerFactory,
    make_scheduler: SchedulerFactory,
    max_grad_norm: float,
    precision: str = "fp32",
    *,
    micro_batch_size: int | None = None,
    accumulation_steps: int = 1,
    grad_scaler: Any = None,
    fill: WeightFill | None = None,
    adapters: AdapterSpec | None = None,
) -> TrainEngine:
    """Parallelize `model` for `strategy` and put it behind the engine protocol.

    `precision` is the loop's autocast setting (fp32/bf16/fp16); the strategy's param_dtype/reduce_dtype are
    the engine-level precision (FSDP2 MixedPrecisionPolicy, DeepSpeed bf16). fp16 needs a grad scaler and is
    supported with single and ddp only. `micro_batch_size` feeds DeepSpeed's batch bookkeeping;
    `accumulation_steps` is a pipeline's micro-batches per step.
    """
    if precision == "fp16" and (
        strategy.engine == "deepspeed"
        or strategy.data_parallel in ("fsdp", "hsdp")
        or strategy.tensor_parallel != 1
        or strategy.pipeline_parallel != 1
    ):
        raise UsageError(
            "precision fp16 is supported with single and ddp only; use bf16 with fsdp/tp/pp/deepspeed"
        )
    if strategy.pipeline_parallel != 1:
        from overdrive.parallel.pipeline_engine import build_pipeline_engine

        # pipeline splitting comes first: every stage module then goes through parallelize on its own
        return build_pipeline_engine(
            model, strategy, runtime, make_optimizer, make_scheduler, precision, fill, accumulation_steps, adapters
        )
    if strategy.engine == "deepspeed":
        from overdrive.parallel.deepspeed_engine import DeepSpeedEngine

        # DeepSpeed owns its wrapper: the transforms before data parallelism run here, DeepSpeed does the rest.
        result = parallelize(
            model, dataclasses.replace(strategy, data_parallel="none"), runtime, fill, adapters
        )
        engine = DeepSpeedEngine(
            model,
            runtime,
            strategy,
            make_optimizer,
            make_scheduler,
            max_grad_norm,
            precision,
            micro_batch_size,
        )
        engine.context_factory = result.loss_context  # activation offload around forward and backward
        return engine
    from overdrive.parallel.engine import TorchEngine

    result = parallelize(model, strategy, runtime, fill, adapters)
    return TorchEngine(
        result.wrapper,
        result.module,
        runtime,
        strategy,
        make_optimizer,
        make_scheduler,
        precision=precision,
        gradient_sync=result.gradient_sync,
        loss_context=result.loss_context,
        grad_scaler=grad_scaler,
    )
