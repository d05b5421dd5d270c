"""Torch data-parallel engines: the shared base (optimizer, clipping, DCP checkpoints) and DDPEngine.

Gradient contract (same for every engine in this package): the loop scales each micro-batch loss as
`sum(token CE) / N_global * world_size`, where N_global is the number of target tokens in the whole global
batch over all ranks. DDP and FSDP *average* gradients over ranks, i.e. divide the summed gradient by
world_size, which cancels the loop's factor; so after the last micro-batch every rank holds exactly the
gradient a single process would get from `sum(token CE over the global batch) / N_global`.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from overdrive.train.engine import OptimizerFactory, Runtime, SchedulerFactory

if TYPE_CHECKING:
    from overdrive.parallel.strategy import Strategy


class TorchDistEngine:
    """What DDP and FSDP share: a torch optimizer and scheduler, clipping, DCP checkpoints.

    `model` is what the loop calls (the wrapper); `module` is the HF model underneath, whose parameter names
    are the checkpoint keys, so DDP, FSDP and single-process checkpoints use the same names.
    """

    checkpoint_format = "dcp"

    def __init__(
        self,
        model: nn.Module,
        module: nn.Module,
        runtime: Runtime,
        strategy: Strategy,
        make_optimizer: OptimizerFactory,
        make_scheduler: SchedulerFactory,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.model = model
        self.module = module
        self.runtime = runtime
        self.strategy = strategy
        self.optimizer = make_optimizer(module)
        self.scheduler = make_scheduler(self.optimizer)
        self.scaler = grad_scaler

    def sync_gradients(self, enabled: bool) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def step(self, max_grad_norm: float) -> float:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = clip_distributed_grad_norm(self.module.parameters(), max_grad_norm)
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
        from overdrive.parallel.checkpoint import save_dcp

        save_dcp(self.module, self.optimizer, self.scheduler, Path(directory), self.runtime, self.scaler)

    def load_checkpoint(self, directory: Path) -> None:
        from overdrive.parallel.checkpoint import load_dcp

        load_dcp(self.module, self.optimizer, self.scheduler, Path(directory), self.scaler)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from overdrive.parallel.checkpoint import full_model_state_dict

        return full_model_state_dict(self.module)

    def unwrapped_model(self) -> nn.Module:
        return getattr(self.module, "_orig_mod", self.module)


def clip_distributed_grad_norm(parameters, max_norm: float) -> float:
    """Pre-clip global grad norm; clips in place when max_norm > 0. Works for plain and DTensor gradients.

    With DTensor gradients (FSDP2) the local shards' norms are combined across ranks by `full_tensor()`; the
    clip coefficient is then applied to the local shards, the same arithmetic as torch.nn.utils.clip_grad_norm_.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for g in local:
            by_device.setdefault((g.device, g.dtype), []).append(g)
        for (device, _), group in by_device.items():
            torch._foreach_mul_(group, coef.to(device))
    value = float(total)
    return value if math.isfinite(value) else float("nan")


class DDPEngine(TorchDistEngine):
    """torch DistributedDataParallel: full replica per rank, gradients all-reduced in buckets during backward.

    `sync_gradients(False)` enters `no_sync()`, so accumulation micro-batches skip the all-reduce and only the
    last one communicates. reduce_dtype bf16 installs `bf16_allreduce_hook` (halves the traffic).
    """

    def __init__(
        self,
        model: nn.Module,
        runtime: Runtime,
        strategy: Strategy,
        make_optimizer: OptimizerFactory,
        make_scheduler: SchedulerFactory,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        from torch.nn.parallel import DistributedDataParallel

        model = model.to(runtime.device)
        kwargs = {"device_ids": [runtime.device.index]} if runtime.device.type == "cuda" else {}
        wrapper = DistributedDataParallel(model, **kwargs)
        if strategy.reduce_dtype == "bf16":
            wrapper.register_comm_hook(None, bf16_allreduce_hook)
        super().__init__(wrapper, model, runtime, strategy, make_optimizer, make_scheduler, grad_scaler)

    def sync_gradients(self, enabled: bool) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext() if enabled else self.model.no_sync()


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
