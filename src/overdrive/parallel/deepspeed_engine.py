"""DeepSpeed engine: ZeRO stages 0-3 with optional CPU offload, behind the TrainEngine protocol.

The DeepSpeed config is generated from the Strategy so that there is one source of truth. Numerics are kept
identical to the single-process loop:

- DeepSpeed divides every backward by `gradient_accumulation_steps` and averages gradients over ranks. We set
  `gradient_accumulation_steps: 1`, call `backward(loss, scale_wrt_gas=False)`, and mark the accumulation
  boundary ourselves (`set_gradient_accumulation_boundary`) in `forward_backward`; the loss factor of
  `MicroBatchEngine` (the data-parallel size) cancels the rank average (see overdrive.core.engine).
- `gradient_clipping` is set to the run's max_grad_norm explicitly (DeepSpeed's default would be 1.0).
- The run's torch optimizer is used as is (`zero_allow_untested_optimizer`), and the LR scheduler is handed
  to DeepSpeed so that it steps exactly once per optimizer step and lands in DeepSpeed's checkpoints.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from overdrive.core.engine import MicroBatchEngine, OptimizerFactory, SchedulerFactory
from overdrive.core.runtime import Runtime
from overdrive.parallel.distributed import backend_name, default_timeout_s
from overdrive.parallel.strategy import Strategy

TAG = "overdrive"


def deepspeed_config(
    strategy: Strategy,
    world_size: int,
    max_grad_norm: float,
    precision: str = "fp32",
    micro_batch_size: int | None = None,
    cuda: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed JSON config for a strategy (see the module docstring for why each key is set)."""
    micro = micro_batch_size or strategy.micro_batch_size or 1
    zero: dict[str, Any] = {"stage": strategy.resolved_zero_stage}
    if strategy.offload in ("optimizer", "optimizer+params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if strategy.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    bf16 = strategy.param_dtype == "bf16" or precision == "bf16"
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro * world_size,
        "gradient_clipping": float(max_grad_norm),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if bf16:
        config["communication_data_type"] = "bf16" if strategy.reduce_dtype == "bf16" else "fp32"
    return config


class DeepSpeedEngine(MicroBatchEngine):
    """deepspeed.initialize around the HF model; `model` is DeepSpeed's engine (call it for forward)."""

    checkpoint_format = "deepspeed"

    def __init__(
        self,
        model: nn.Module,
        runtime: Runtime,
        strategy: Strategy,
        make_optimizer: OptimizerFactory,
        make_scheduler: SchedulerFactory,
        max_grad_norm: float,
        precision: str = "fp32",
        micro_batch_size: int | None = None,
    ) -> None:
        import datetime

        import deepspeed

        cuda = runtime.device.type == "cuda"
        deepspeed.init_distributed(
            dist_backend=backend_name(),
            timeout=datetime.timedelta(seconds=default_timeout_s(cuda)),
            verbose=False,
        )
        self.runtime = runtime
        self.strategy = strategy
        self.precision = precision
        self.max_grad_norm = float(max_grad_norm)
        self.config = deepspeed_config(
            strategy, runtime.world_size, max_grad_norm, precision, micro_batch_size, cuda
        )
        model = model.to(runtime.device)
        optimizer = make_optimizer(model)
        scheduler = make_scheduler(optimizer)
        engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.config,
            dist_init_required=False,
        )
        self.model = engine
        self.optimizer = ds_optimizer
        self.scheduler = ds_scheduler
        _use_safe_loading(engine)

    @property
    def zero_stage(self) -> int:
        return int(self.model.zero_optimization_stage())

    @contextlib.contextmanager
    def _boundary(self, enabled: bool) -> Iterator[None]:
        self.model.set_gradient_accumulation_boundary(enabled)
        yield

    def sync_gradients(self, enabled: bool) -> contextlib.AbstractContextManager[None]:
        """enabled=False: accumulate locally; True marks the last micro-batch (reductions finish there)."""
        return self._boundary(enabled)

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)

    def step(self, max_grad_norm: float) -> float:
        if float(max_grad_norm) != self.max_grad_norm:
            raise ValueError(
                f"DeepSpeed fixes gradient clipping at initialization ({self.max_grad_norm}); got {max_grad_norm}"
            )
        self.model.set_gradient_accumulation_boundary(True)
        own_norm = None if self.zero_stage > 0 or self.config["bf16"]["enabled"] else self._local_norm()
        self.model.step()
        norm = self.model.get_global_grad_norm()
        value = float(norm) if norm is not None else own_norm
        if value is None:
            return float("nan")
        return value if math.isfinite(value) else float("nan")

    def _local_norm(self) -> float | None:
        """Stage 0 fp32 keeps full, already all-reduced gradients in .grad; DeepSpeed does not report their norm."""
        grads = [p.grad for p in self.model.module.parameters() if p.grad is not None]
        if not grads:
            return None
        from overdrive.parallel.grad_norm import total_norm

        return float(total_norm(grads))

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save_checkpoint(self, directory: Path) -> None:
        self.model.save_checkpoint(str(Path(directory) / "deepspeed"), tag=TAG, save_latest=False)

    def load_checkpoint(self, directory: Path) -> None:
        path, _ = self.model.load_checkpoint(
            str(Path(directory) / "deepspeed"),
            tag=TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}/deepspeed/{TAG}")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Gathered weights on CPU, complete on rank 0 (a collective under ZeRO-3: call on every rank)."""
        if self.zero_stage == 3:
            state = self.model._zero3_consolidated_16bit_state_dict()
            return {k: v.detach().cpu() for k, v in (state or {}).items()}
        return {k: v.detach().cpu() for k, v in self.model.module.state_dict().items()}

    def unwrapped_model(self) -> nn.Module:
        return self.model.module


# ---------------------------------------------------------------- safe loading of DeepSpeed files


def _safe_globals() -> list[Any]:
    """The non-tensor classes DeepSpeed pickles into its checkpoints, allowed for weights_only loading."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _safe_torch_load(path: Any, map_location: Any = None) -> Any:
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


@contextlib.contextmanager
def _weights_only_torch_load() -> Iterator[None]:
    """Make DeepSpeed's offline tools (zero_to_fp32), which call torch.load(weights_only=False), load safely."""
    original = torch.load

    def safe_load(f: Any, map_location: Any = None, **_: Any) -> Any:
        with torch.serialization.safe_globals(_safe_globals()):
            return original(f, map_location=map_location, weights_only=True)

    torch.load = safe_load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = original  # type: ignore[assignment]


def _use_safe_loading(engine: Any) -> None:
    """Make DeepSpeed's torch checkpoint reader load with weights_only=True (its default is False)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if isinstance(checkpoint_engine, TorchCheckpointEngine):
        checkpoint_engine.load = _safe_torch_load


def deepspeed_fp32_state_dict(deepspeed_dir: Path) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights from a DeepSpeed checkpoint directory, offline (no process group)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with _weights_only_torch_load():
        return get_fp32_state_dict_from_zero_checkpoint(str(deepspeed_dir), tag=TAG)
