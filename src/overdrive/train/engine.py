"""The seam between the training loop and whatever executes the model.

The loop in `overdrive.train.loop` never talks to DDP, FSDP2 or DeepSpeed directly: it asks a `TrainEngine`
to run backward, step, save and load. `LocalEngine` is the single-process engine; the distributed ones live
in `overdrive.parallel` and implement the same protocol, so the loop reads the same for every strategy.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


@dataclass
class Runtime:
    """Where this process runs: its rank in the job, the world size, its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all ranks (identity on one process)."""
        if self.world_size > 1:
            import torch.distributed as dist

            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class TrainEngine(Protocol):
    """What the loop needs from an execution engine."""

    model: nn.Module  # call this for forward passes (may be a wrapper)
    runtime: Runtime

    def sync_gradients(self, enabled: bool) -> contextlib.AbstractContextManager[None]:
        """Context for one micro-batch; `enabled=False` skips the gradient all-reduce (accumulation)."""
        ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, max_grad_norm: float) -> float:
        """Clip (when max_grad_norm > 0), step optimizer and scheduler, zero grads; return the pre-clip grad norm."""
        ...

    def current_lr(self) -> float: ...

    def save_checkpoint(self, directory: Path) -> None:
        """Write model, optimizer and scheduler state into `directory` (called on every rank)."""
        ...

    def load_checkpoint(self, directory: Path) -> None: ...

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded model weights on CPU (complete on rank 0) for the HF export."""
        ...

    def unwrapped_model(self) -> nn.Module:
        """The underlying HF model (for generate, config, save_pretrained)."""
        ...


class LocalEngine:
    """Single-process engine: plain module, torch optimizer, optional fp16 grad scaler."""

    def __init__(
        self,
        model: nn.Module,
        make_optimizer: OptimizerFactory,
        make_scheduler: SchedulerFactory,
        runtime: Runtime,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.model = model
        self.runtime = runtime
        self.optimizer = make_optimizer(model)
        self.scheduler = make_scheduler(self.optimizer)
        self.scaler = grad_scaler

    def sync_gradients(self, enabled: bool) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def step(self, max_grad_norm: float) -> float:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm(self.model.parameters(), max_grad_norm)
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
        from safetensors.torch import save_model

        save_model(self.model, str(directory / "model.safetensors"))
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        torch.save(state, directory / "optimizer.pt")

    def load_checkpoint(self, directory: Path) -> None:
        from safetensors.torch import load_model

        load_model(self.model, str(directory / "model.safetensors"))
        state = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def unwrapped_model(self) -> nn.Module:
        return getattr(self.model, "_orig_mod", self.model)


def clip_grad_norm(parameters: Iterator[nn.Parameter] | Any, max_norm: float) -> float:
    """Total grad norm (pre-clip); clips in place only when max_norm > 0."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    value = float(norm)
    return value if math.isfinite(value) else float("nan")
