"""Distributed strategies on real engines: DDP, FSDP2 (ZeRO-2/3, HSDP, offload) and DeepSpeed ZeRO 0-3.

Entry points for the training loop:

    strategy = Strategy.from_name_or_path("fsdp")          # preset name or YAML file
    runtime = init_runtime(strategy)                        # validates, then starts the process group
    engine = build_engine(model, strategy, runtime, make_optimizer, make_scheduler, max_grad_norm, precision)
    save_checkpoint(engine, path, extra) / load_checkpoint(engine, path) / export_hf(path, out)
    shutdown()

`build_engine` applies the model transforms in one fixed order (see TRANSFORM_ORDER) and then wraps the
model in the engine the strategy names. Importing this package does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from overdrive.errors import UsageError
from overdrive.parallel.strategy import PRESETS, Strategy

if TYPE_CHECKING:
    from torch import nn

    from overdrive.train.engine import OptimizerFactory, Runtime, SchedulerFactory, TrainEngine

__all__ = [
    "PRESETS",
    "TRANSFORM_ORDER",
    "Strategy",
    "apply_transforms",
    "build_engine",
    "export_hf",
    "init_runtime",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "shutdown",
]

# Why this order: kernels replace modules, so they come first; recompute wraps whole decoder layers and must
# see the final layer code; compile traces the layer including its recompute; tensor/pipeline parallelism
# (not implemented yet) would re-shape the compiled layers; data parallelism (DDP/FSDP/DeepSpeed) wraps last
# because it owns parameter storage and its hooks must run around everything else.
TRANSFORM_ORDER: tuple[str, ...] = (
    "kernels",
    "activation_checkpointing",
    "compile",
    "tensor_parallel",
    "pipeline_parallel",
    "data_parallel",
)

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


def apply_transforms(model: nn.Module, strategy: Strategy) -> list[str]:
    """Apply the single-model transforms of TRANSFORM_ORDER (everything before data parallelism) in place.

    Returns the names of the steps applied, in order, for logs and tests.
    """
    applied: list[str] = []
    for step in TRANSFORM_ORDER:
        if step == "kernels" and strategy.kernels:
            _apply_kernels(model)
        elif step == "activation_checkpointing" and strategy.activation_checkpointing != "none":
            every = strategy.ac_every if strategy.activation_checkpointing == "every_k" else 1
            apply_activation_checkpointing(model, every)
        elif step == "compile" and strategy.compile:
            apply_compile(model)
        else:
            continue
        applied.append(step)
    return applied


def _apply_kernels(model: nn.Module) -> None:
    try:
        from overdrive.patches import patch_model
    except ImportError as exc:
        raise UsageError(f"strategy kernels: true but overdrive's kernels are unavailable ({exc})") from None
    patch_model(model)


def apply_activation_checkpointing(model: nn.Module, every: int = 1) -> int:
    """Recompute decoder layers 0, every, 2*every... in backward instead of storing their activations.

    The layer's `forward` is replaced on the instance (non-reentrant torch checkpoint), so parameter names,
    state dicts and FSDP/DeepSpeed hooks on `__call__` are unchanged. Returns the number of layers wrapped.
    """
    import functools

    import torch.utils.checkpoint

    from overdrive.parallel.distributed import decoder_layers

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


def apply_compile(model: nn.Module) -> int:
    """torch.compile each decoder layer in place (regional compile; parameter names unchanged)."""
    from overdrive.kernels.compile import compile_regions

    return compile_regions(model)


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
    grad_scaler: Any = None,
) -> TrainEngine:
    """Transform `model` (TRANSFORM_ORDER) and wrap it in the engine of `strategy`.

    `precision` is the loop's autocast setting (fp32/bf16/fp16); the strategy's param_dtype/reduce_dtype are
    the engine-level precision (FSDP2 MixedPrecisionPolicy, DeepSpeed bf16). fp16 needs a grad scaler and is
    supported with single and ddp only. `micro_batch_size` feeds DeepSpeed's batch bookkeeping.
    """
    from overdrive.train.engine import LocalEngine

    if precision == "fp16" and (strategy.engine == "deepspeed" or strategy.data_parallel in ("fsdp", "hsdp")):
        raise UsageError("precision fp16 is supported with single and ddp only; use bf16 with fsdp/deepspeed")
    apply_transforms(model, strategy)
    if strategy.engine == "deepspeed":
        from overdrive.parallel.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(
            model,
            runtime,
            strategy,
            make_optimizer,
            make_scheduler,
            max_grad_norm,
            precision,
            micro_batch_size,
        )
    if strategy.data_parallel == "ddp":
        from overdrive.parallel.ddp import DDPEngine

        return DDPEngine(model, runtime, strategy, make_optimizer, make_scheduler, grad_scaler)
    if strategy.data_parallel in ("fsdp", "hsdp"):
        from overdrive.parallel.fsdp import FSDPEngine

        return FSDPEngine(model, runtime, strategy, make_optimizer, make_scheduler)
    return LocalEngine(model.to(runtime.device), make_optimizer, make_scheduler, runtime, grad_scaler)
