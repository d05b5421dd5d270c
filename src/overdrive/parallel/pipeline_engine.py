"""PipelineEngine: this rank's pipeline stages run by a torch.distributed.pipelining schedule.

The loss contract is the one every engine keeps: each micro-batch's summed CE over the global batch's target
count, so a pipelined step's loss and gradients equal the single-process step's. The schedule does not scale
gradients (`scale_grads=False`); FSDP2 inside a stage averages over the data-parallel ranks, so the loss it
backpropagates is multiplied by their number, as in MicroBatchEngine. Evaluation runs the stages forward one
after another with point-to-point sends (no schedule, any batch shape).
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from overdrive.core.engine import Batch, OptimizerFactory, SchedulerFactory, autocast, local_value
from overdrive.core.runtime import Runtime
from overdrive.parallel.grad_norm import clip_, squared_norm
from overdrive.parallel.pipeline import SCHEDULE_CLASSES, STAGE_ATTR, StageSpec

if TYPE_CHECKING:
    from overdrive.parallel.strategy import Strategy

_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


class PipelineEngine:
    """`stages` are this rank's stage modules (parallelized, filled), in stage order; `full_model` is the
    unsplit meta model, kept for its config and `save_pretrained` at export."""

    checkpoint_format = "dcp"

    def __init__(
        self,
        stages: list[nn.Module],
        full_model: nn.Module,
        runtime: Runtime,
        strategy: Strategy,
        make_optimizer: OptimizerFactory,
        make_scheduler: SchedulerFactory,
        *,
        precision: str = "fp32",
        n_microbatches: int,
    ) -> None:
        from torch.distributed.pipelining import PipelineStage, schedules

        assert runtime.mesh is not None
        self.stages = stages
        self.model = nn.ModuleList(stages)  # train()/eval() reach every stage
        self.full_model = full_model
        self.runtime = runtime
        self.strategy = strategy
        self.precision = precision
        self.specs: list[StageSpec] = [_spec(m) for m in stages]
        self.pp_mesh = runtime.mesh["pp"]
        self.pp_group = self.pp_mesh.get_group()
        self.optimizers = [make_optimizer(m) for m in stages]
        self.schedulers = [make_scheduler(o) for o in self.optimizers]
        n_stages = self.specs[0].num_stages
        self.holder = _stage_holders(strategy, runtime.dims.pp, n_stages)
        pipeline_stages = [
            PipelineStage(m, spec.index, n_stages, runtime.device, group=self.pp_group)
            for m, spec in zip(stages, self.specs, strict=True)
        ]
        cls = getattr(schedules, SCHEDULE_CLASSES[strategy.pipeline_schedule])
        single = strategy.pipeline_schedule in ("gpipe", "1f1b")
        self.schedule = cls(
            pipeline_stages[0] if single else pipeline_stages,
            n_microbatches,
            loss_fn=self._loss_fn,
            scale_grads=False,
        )
        self.tied = TiedEmbeddingSync(stages, self.specs, runtime, self.holder[-1])

    # ------------------------------------------------------------------ training

    def _loss_fn(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return output.sum() * self.runtime.dp_size  # FSDP2 averages gradients over the dp ranks

    def forward_backward(self, micro_batches: Sequence[Batch], num_items: int) -> torch.Tensor:
        device = self.runtime.device
        batch = {k: torch.cat([mb[k] for mb in micro_batches]).to(device) for k in micro_batches[0]}
        for spec in self.specs:
            spec.num_items = max(num_items, 1)
        kwargs = {k: batch[k] for k in ("position_ids", "labels") if k in batch}
        args = (batch["input_ids"],) if self.specs[0].is_first else ()
        losses: list[torch.Tensor] = []
        with autocast(self.precision, device), self._loss_context():
            self.schedule.step(*args, target=batch["labels"], losses=losses, return_outputs=False, **kwargs)
        total = torch.zeros((), device=device)
        if losses:
            total += (
                torch.stack([local_value(x.detach()).float() for x in losses]).sum() / self.runtime.dp_size
            )
        self.tied.sync_gradients()
        return self._from_last_stage(total)

    def _from_last_stage(self, value: torch.Tensor) -> torch.Tensor:
        """The last stage's value on every rank of the pipeline (the others contribute zero)."""
        value = value.clone()
        dist.all_reduce(value, group=self.pp_group)
        return value

    def step(self, max_grad_norm: float) -> float:
        grads = [p.grad for m in self.stages for p in m.parameters() if p.grad is not None]
        counted = self._gradients()
        total = self._from_last_stage(squared_norm(counted)).sqrt()
        if max_grad_norm > 0:
            clip_(grads, total, max_grad_norm)
        for optimizer, scheduler in zip(self.optimizers, self.schedulers, strict=True):
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        value = float(total)
        return value if math.isfinite(value) else float("nan")

    def _gradients(self) -> list[torch.Tensor]:
        """Every local gradient once: the last stage's copy of a tied embedding is counted by the first."""
        skip = self.tied.duplicate_ids()
        return [
            p.grad for m in self.stages for p in m.parameters() if p.grad is not None and id(p) not in skip
        ]

    @property
    def optimizer(self) -> Any:
        """All local stages' optimizer state, for reporting (each stage steps its own optimizer)."""
        if len(self.optimizers) == 1:
            return self.optimizers[0]
        return types.SimpleNamespace(state={p: s for o in self.optimizers for p, s in o.state.items()})

    def current_lr(self) -> float:
        return float(self.optimizers[0].param_groups[0]["lr"])

    # ------------------------------------------------------------------ evaluation

    def loss_context(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # entered by forward_backward and eval_loss themselves

    def _loss_context(self) -> contextlib.AbstractContextManager[None]:
        """Tensor parallelism's loss on vocabulary shards around the stage that holds lm_head; activation
        offload around every stage's forward and backward."""
        stack = contextlib.ExitStack()
        if self.strategy.activation_offload:
            from overdrive.parallel.offload import activation_offload

            stack.enter_context(activation_offload(self.runtime.device))
        if self.runtime.dims.tp > 1:
            from overdrive.parallel.tensor import is_vocab_parallel, tp_loss_context

            for module in self.stages:
                if is_vocab_parallel(module):
                    stack.enter_context(tp_loss_context(module))
        return stack

    @torch.no_grad()
    def eval_loss(self, batch: Batch, num_items: int) -> torch.Tensor:
        """Forward through the stages in order (sends between ranks), the loss from the last stage."""
        device = self.runtime.device
        batch = {k: v.to(device) for k, v in batch.items()}
        kwargs = {k: batch[k] for k in ("position_ids", "labels") if k in batch}
        loss = torch.zeros((), device=device)
        x: torch.Tensor | None = None
        with autocast(self.precision, device), self._loss_context():
            for stage_id in range(self.specs[0].num_stages):
                here = self.holder[stage_id] == self.pp_mesh.get_local_rank()
                if not here:
                    continue
                module, spec = self._local(stage_id)
                if spec.is_first:
                    x = batch["input_ids"]
                elif self.holder[stage_id - 1] != self.holder[stage_id]:
                    x = self._recv(self.holder[stage_id - 1])
                spec.num_items = max(num_items, 1)
                out = module(x, **kwargs)
                if spec.is_last:
                    loss = local_value(out).float().sum()
                elif self.holder[stage_id + 1] != self.holder[stage_id]:
                    self._send(out, self.holder[stage_id + 1])
                else:
                    x = out
        return self._from_last_stage(loss)

    def _local(self, stage_id: int) -> tuple[nn.Module, StageSpec]:
        for module, spec in zip(self.stages, self.specs, strict=True):
            if spec.index == stage_id:
                return module, spec
        raise KeyError(stage_id)

    def _send(self, tensor: torch.Tensor, to: int) -> None:
        header = torch.tensor([*tensor.shape, _DTYPES.index(tensor.dtype)], dtype=torch.long)
        dist.send(header.to(self.runtime.device), group=self.pp_group, group_dst=to)
        dist.send(tensor.contiguous(), group=self.pp_group, group_dst=to)

    def _recv(self, source: int) -> torch.Tensor:
        header = torch.empty(4, dtype=torch.long, device=self.runtime.device)
        dist.recv(header, group=self.pp_group, group_src=source)
        *shape, code = header.tolist()
        out = torch.empty(shape, dtype=_DTYPES[code], device=self.runtime.device)
        dist.recv(out, group=self.pp_group, group_src=source)
        return out

    # ------------------------------------------------------------------ checkpoints and export

    def save_checkpoint(self, directory: Path) -> None:
        from overdrive.parallel.checkpoint import save_dcp

        save_dcp(self.stages, self.optimizers, self.schedulers[0], Path(directory), self.runtime)

    def load_checkpoint(self, directory: Path) -> None:
        from overdrive.parallel.checkpoint import load_dcp

        load_dcp(self.stages, self.optimizers, self.schedulers, Path(directory))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every stage's unsharded weights, gathered on rank 0 (a collective: call on every rank)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=False)
        state: dict[str, torch.Tensor] = {}
        for module in self.stages:
            state.update(
                {k: v.detach().cpu() for k, v in get_model_state_dict(module, options=options).items()}
            )
        # one rank per stage (data- and tensor-parallel rank 0) hands its stages' weights to rank 0
        if self.runtime.dp_rank != 0 or not _first_of_tp(self.runtime):
            return {}
        gathered: list[Any] = [None] * self.runtime.dims.pp if self.runtime.is_main else []
        dist.gather_object(
            state, gathered if self.runtime.is_main else None, group=self.pp_group, group_dst=0
        )
        if not self.runtime.is_main:
            return {}
        merged: dict[str, torch.Tensor] = {}
        for part in gathered:
            merged.update(part)
        return merged

    def unwrapped_model(self) -> nn.Module:
        return self.full_model


def _spec(module: nn.Module) -> StageSpec:
    return getattr(module, STAGE_ATTR)


def _first_of_tp(runtime: Runtime) -> bool:
    return runtime.dims.tp == 1 or runtime.mesh["tp"].get_local_rank() == 0


def _stage_holders(strategy: Strategy, pp: int, n_stages: int) -> list[int]:
    """Pipeline rank that holds each stage."""
    from overdrive.parallel.pipeline import stages_of_rank

    holder = [0] * n_stages
    for rank in range(pp):
        for stage in stages_of_rank(rank, pp, strategy.virtual_stages, strategy.pipeline_schedule):
            holder[stage] = rank
    return holder


class TiedEmbeddingSync:
    """Adds the embedding and lm_head gradients of a tied model split over the first and last stages.

    The single model's tied weight gets both gradients; here each stage holds a copy, so the two ranks
    (same data- and tensor-parallel coordinates) exchange theirs, and both copies take the same step.
    """

    def __init__(
        self, stages: list[nn.Module], specs: list[StageSpec], runtime: Runtime, last_holder: int
    ) -> None:
        self.params: list[nn.Parameter] = []
        self.last_copy: set[int] = set()
        self.group = None
        if not getattr(stages[0].config, "tie_word_embeddings", False):
            return
        for module, spec in zip(stages, specs, strict=True):
            if spec.is_first or spec.is_last:
                weight = module.get_input_embeddings().weight
                self.params.append(weight)
                if spec.is_last:
                    self.last_copy.add(id(weight))
        self.group = _tie_group(runtime, last_holder)  # collective: every rank creates the groups

    def duplicate_ids(self) -> set[int]:
        return self.last_copy

    def sync_gradients(self) -> None:
        from torch.distributed.tensor import DTensor

        if not self.params:
            return
        for p in self.params:  # a vocab-parallel embedding's gradient can come back replicated: shard it
            if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                p.grad = p.grad.redistribute(p.device_mesh, p.placements)
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in self.params]
        if len(grads) == 2:  # both stages on this rank (V-shaped schedule)
            total = grads[0] + grads[1]
            grads[0].copy_(total)
            grads[1].copy_(total)
        elif self.group is not None:
            dist.all_reduce(grads[0], group=self.group)


def _tie_group(runtime: Runtime, last_holder: int) -> Any:
    """The 2-rank groups (first stage's rank, last stage's rank) of every data/tensor coordinate; this rank's."""
    if last_holder == 0:
        return None
    grid = runtime.mesh.mesh  # global ranks, shape (pp, dp_replicate, dp_shard, tp)
    pairs = [[int(a), int(b)] for a, b in zip(grid[0].flatten(), grid[last_holder].flatten(), strict=True)]
    mine, _ = dist.new_subgroups_by_enumeration(pairs)
    return mine


def build_pipeline_engine(
    model: nn.Module,
    strategy: Strategy,
    runtime: Runtime,
    make_optimizer: OptimizerFactory,
    make_scheduler: SchedulerFactory,
    precision: str,
    fill: Any,
    n_microbatches: int,
    adapters: Any = None,
) -> PipelineEngine:
    """Split `model` (on meta) into this rank's stages, parallelize and fill each, and schedule them."""
    import sys

    from overdrive.parallel import parallelize
    from overdrive.parallel.pipeline import describe_split, split_model

    stages = split_model(model, strategy, runtime)
    if runtime.is_main:
        print(f"overdrive: note: {describe_split(model, strategy, runtime.dims.pp)}", file=sys.stderr)
    for stage in stages:
        parallelize(stage, strategy, runtime, fill, adapters)
    return PipelineEngine(
        stages,
        model,
        runtime,
        strategy,
        make_optimizer,
        make_scheduler,
        precision=precision,
        n_microbatches=n_microbatches,
    )
