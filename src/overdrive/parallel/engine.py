"""TorchEngine: a torch model under any layout overdrive builds (plain, DDP, FSDP2/HSDP, tensor parallel, 2-D)
with a torch optimizer, clipping over every shard, and checkpoints.

Checkpoints: with a process group, DCP (each rank writes its shards, keyed by parameter name, so another layout
can load them); a plain single-process run writes model.safetensors + optimizer.pt.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from overdrive.core.engine import MicroBatchEngine, OptimizerFactory, SchedulerFactory
from overdrive.core.runtime import Runtime

if TYPE_CHECKING:
    from overdrive.parallel.data import GradientSync
    from overdrive.parallel.strategy import Strategy


class TorchEngine(MicroBatchEngine):
    """`model` is what the loop calls (a DDP wrapper or the module); `module` is the HF model underneath, whose
    parameter names are the checkpoint keys on every layout."""

    def __init__(
        self,
        model: nn.Module,
        module: nn.Module,
        runtime: Runtime,
        strategy: Strategy,
        make_optimizer: OptimizerFactory,
        make_scheduler: SchedulerFactory,
        *,
        precision: str = "fp32",
        gradient_sync: GradientSync | None = None,
        loss_context: Callable[[], contextlib.AbstractContextManager[None]] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.model = model
        self.module = module
        self.runtime = runtime
        self.strategy = strategy
        self.precision = precision
        self.optimizer = make_optimizer(module)
        self.scheduler = make_scheduler(self.optimizer)
        self.scaler = grad_scaler
        self._gradient_sync = gradient_sync
        self.context_factory = loss_context
        self.checkpoint_format = "dcp" if runtime.mesh is not None else "local"

    def sync_gradients(self, enabled: bool) -> contextlib.AbstractContextManager[None]:
        return self._gradient_sync(enabled) if self._gradient_sync else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def step(self, max_grad_norm: float) -> float:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm(self.module.parameters(), max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save_checkpoint(self, directory: Path) -> None:
        if self.checkpoint_format == "dcp":
            from overdrive.parallel.checkpoint import save_dcp

            save_dcp(self.module, self.optimizer, self.scheduler, Path(directory), self.runtime, self.scaler)
            return
        from safetensors.torch import save_model

        from overdrive.parallel.adapters import is_quantized, save_trainable

        if is_quantized(self.module):  # QLoRA: the fill rebuilds the NF4 base; the adapters are the state
            save_trainable(self.module, Path(directory) / "model.safetensors")
        else:
            save_model(self.module, str(Path(directory) / "model.safetensors"))
        from overdrive.parallel.local_format import optimizer_param_names

        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "param_names": optimizer_param_names(self.optimizer, self.module),  # so N ranks can load it
        }
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        torch.save(state, Path(directory) / "optimizer.pt")

    def load_checkpoint(self, directory: Path) -> None:
        if self.checkpoint_format == "dcp":
            from overdrive.parallel.checkpoint import load_dcp

            load_dcp(self.module, self.optimizer, self.scheduler, Path(directory), self.scaler)
            return
        from safetensors.torch import load_model

        from overdrive.parallel.adapters import is_quantized, load_trainable

        if is_quantized(self.module):
            load_trainable(self.module, Path(directory) / "model.safetensors")
        else:
            load_model(self.module, str(Path(directory) / "model.safetensors"))
        state = torch.load(Path(directory) / "optimizer.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from overdrive.parallel.checkpoint import full_model_state_dict

        return full_model_state_dict(self.module)

    def unwrapped_model(self) -> nn.Module:
        return getattr(self.module, "_orig_mod", self.module)


def clip_grad_norm(parameters, max_norm: float) -> float:
    """Pre-clip global grad norm over plain and DTensor gradients (any mesh); clips in place when max_norm > 0."""
    from overdrive.parallel.grad_norm import clip_, total_norm

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    total = total_norm(grads)
    if max_norm > 0:
        clip_(grads, total, max_norm)
    value = float(total)
    return value if math.isfinite(value) else float("nan")
