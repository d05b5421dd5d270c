"""The seam between the training loop and whatever executes the model.

The loop never talks to DDP, FSDP2, tensor parallelism or DeepSpeed: it hands an engine the micro-batches of a
step (`forward_backward`) and asks it to `step`, save and load. Every engine keeps one numeric contract: the
gradient after `forward_backward` is that of `sum(token CE over the global batch) / num_items`, whatever the
parallel layout, so a loss curve is the same on 1 process and on N ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from overdrive.core.runtime import Runtime

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
Batch = dict[str, torch.Tensor]


class TrainEngine(Protocol):
    """What the loop needs from an execution engine."""

    model: nn.Module  # call this for forward passes (may be a wrapper)
    runtime: Runtime

    def forward_backward(self, micro_batches: Sequence[Batch], num_items: int) -> torch.Tensor:
        """Forward and backward over this rank's micro-batches of one step; the summed (detached) loss.

        `num_items` is the number of target tokens of the whole global batch (all data-parallel ranks).
        """
        ...

    def step(self, max_grad_norm: float) -> float:
        """Clip (when max_grad_norm > 0), step optimizer and scheduler, zero grads; return the pre-clip grad norm."""
        ...

    def current_lr(self) -> float: ...

    def eval_loss(self, batch: Batch, num_items: int) -> torch.Tensor:
        """The loss of one evaluation batch (summed CE / `num_items`), without gradients, on every rank."""
        ...

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


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[None]:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class MicroBatchEngine:
    """`forward_backward` for engines that run micro-batches one after another (all but pipelines).

    Subclasses provide `sync_gradients(last)` (skip the gradient reduction until the last micro-batch) and
    `backward(loss)`. Data-parallel wrappers average gradients over the data-parallel ranks, so each loss is
    multiplied by their number: the average of per-rank `sum CE / num_items` times dp is the global sum.
    Tensor-parallel ranks of one data-parallel rank compute the same loss and need no factor.
    """

    model: nn.Module
    runtime: Runtime
    precision: str = "fp32"

    def sync_gradients(self, enabled: bool) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    # Entered around each micro-batch's forward and backward (set from `Parallelized.loss_context`): tensor
    # parallelism's loss on vocab shards, activation offload to host memory; None enters nothing.
    context_factory: Callable[[], contextlib.AbstractContextManager[None]] | None = None

    def loss_context(self) -> contextlib.AbstractContextManager[None]:
        """Around forward and backward: tensor parallelism computes the loss on vocab shards here."""
        return self.context_factory() if self.context_factory else contextlib.nullcontext()

    def forward_backward(self, micro_batches: Sequence[Batch], num_items: int) -> torch.Tensor:
        device = self.runtime.device
        total = torch.zeros((), device=device)
        for i, batch in enumerate(micro_batches):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with self.sync_gradients(i == len(micro_batches) - 1), self.loss_context():
                with autocast(self.precision, device):
                    loss = self.model(**batch, num_items_in_batch=max(num_items, 1)).loss
                self.backward(loss * self.runtime.dp_size)
            total += local_value(loss.detach()).float()
        return total


    @torch.no_grad()
    def eval_loss(self, batch: Batch, num_items: int) -> torch.Tensor:
        device = self.runtime.device
        batch = {k: v.to(device) for k, v in batch.items()}
        with self.loss_context(), autocast(self.precision, device):
            return local_value(self.model(**batch, num_items_in_batch=max(num_items, 1)).loss)


def local_value(loss: torch.Tensor) -> torch.Tensor:
    """A loss that tensor parallelism returns as a (replicated) DTensor, as a plain tensor."""
    full = getattr(loss, "full_tensor", None)
    return full() if callable(full) else loss
