"""Pipeline parallelism for unmodified HF causal LMs: split the decoder layers into stages, one module each.

A stage is a copy of the whole HF model (on meta, so copies are free) with the layers of other stages removed:
the first stage keeps the input embeddings, the last the final norm, lm_head and the loss; the others hand
hidden states on. Layers keep their index in the full model (`model.layers.7...`), so checkpoints, weight
filling and export use the same names on any pipeline degree. Each stage runs the HF base model's own forward
(`inputs_embeds=` for every stage but the first), which builds the rotary embeddings and the causal / document
mask from the position ids it is given, so packed documents stay apart on every stage.

Tied embeddings (lm_head sharing the embedding matrix) stay tied: the last stage keeps the embedding module for
its lm_head, and after backward the first and last stages add their gradients (`TiedEmbeddingSync`), so both
copies take the same optimizer step the single model takes.
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from overdrive.core.layers import decoder_layers
from overdrive.errors import UsageError

if TYPE_CHECKING:
    from overdrive.core.runtime import Runtime
    from overdrive.parallel.strategy import Strategy

# torch.distributed.pipelining class of each schedule name (Strategy.pipeline_schedule)
SCHEDULE_CLASSES = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved-1f1b": "ScheduleInterleaved1F1B",
    "interleaved-zero-bubble": "ScheduleInterleavedZeroBubble",
    "zbv-zero-bubble": "ScheduleZBVZeroBubble",
}
STAGE_ATTR = "_overdrive_pipeline_stage"
TP_STREAM_ATTR = "_overdrive_tp_stream"  # set by tensor parallelism on a stage (overdrive.parallel.tensor)


@dataclass
class StageSpec:
    """Which part of the model a stage module is; `num_items` is set per step (the global target count)."""

    index: int
    num_stages: int
    layers: range
    num_items: int = 1

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1


class StageLayers(nn.ModuleList):
    """The decoder layers of one stage, registered under their index in the full model (checkpoint names).

    Iteration and slicing (`layers[:num_hidden_layers]`, as HF forwards do) yield the stage's layers in order.
    """

    def __init__(self, layers: dict[int, nn.Module]) -> None:
        super().__init__()
        for index, layer in layers.items():
            self.add_module(str(index), layer)

    def __getitem__(self, idx: int | slice) -> Any:
        return list(self._modules.values())[idx]

    def __iter__(self) -> Any:
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)


# ------------------------------------------------------------------------------------------------- splitting


def stage_costs(model: nn.Module) -> tuple[list[int], int, int]:
    """(parameters per decoder layer, embedding parameters, lm_head parameters): what `auto` balances."""
    layers = decoder_layers(model)
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    embed = model.get_input_embeddings().weight.numel()
    head = getattr(model, "lm_head", None)
    head_params = head.weight.numel() if isinstance(head, nn.Module) else embed  # tied: same matmul work
    return per_layer, embed, head_params


def split_layers(
    n_layers: int, n_stages: int, split: str | list[int], costs: tuple[list[int], int, int]
) -> list[range]:
    """Contiguous layer ranges, one per stage, each with at least one layer.

    `auto` minimises the largest stage cost (parameters, with the embedding on the first stage and lm_head on
    the last), by dynamic programming over the split points; a list names each later stage's first layer.
    """
    if n_stages > n_layers:
        raise UsageError(
            f"{n_stages} pipeline stages need at least {n_stages} decoder layers but the model has {n_layers}; "
            "lower pipeline_parallel or virtual_stages"
        )
    if split != "auto":
        starts = [0, *split]
        if len(starts) != n_stages or starts[-1] >= n_layers:
            raise UsageError(
                f"pipeline_split {split} must list {n_stages - 1} first-layer indices below {n_layers} for "
                f"{n_stages} stages"
            )
        return [range(a, b) for a, b in zip(starts, [*starts[1:], n_layers], strict=True)]
    per_layer, embed, head = costs
    return _balanced(per_layer, n_stages, embed, head)


def _balanced(per_layer: list[int], n_stages: int, first_extra: int, last_extra: int) -> list[range]:
    n = len(per_layer)
    prefix = [0]
    for c in per_layer:
        prefix.append(prefix[-1] + c)

    def cost(a: int, b: int, stage: int) -> int:
        extra = (first_extra if stage == 0 else 0) + (last_extra if stage == n_stages - 1 else 0)
        return prefix[b] - prefix[a] + extra

    # best[s][i]: the smallest possible largest cost when stages 0..s-1 hold layers 0..i-1
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0
    for s in range(1, n_stages + 1):
        for i in range(s, n - (n_stages - s) + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], cost(j, i, s - 1))
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    bounds, i = [], n
    for s in range(n_stages, 0, -1):
        bounds.append(range(cut[s][i], i))
        i = cut[s][i]
    return bounds[::-1]


def stages_of_rank(pp_rank: int, pp: int, virtual: int, schedule: str) -> list[int]:
    """Stage indices held by one rank: round-robin (loop), or r and 2P-1-r for the V-shaped schedule."""
    if schedule == "zbv-zero-bubble":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + v * pp for v in range(virtual)]


def build_stage(model: nn.Module, spec: StageSpec) -> nn.Module:
    """A copy of the (meta) HF model holding only stage `spec`'s part, whose forward is the stage's."""
    stage = copy.deepcopy(model)
    base = getattr(stage, stage.base_model_prefix)
    container_name, layers = _layer_container(base)
    setattr(base, container_name, StageLayers({i: layers[i] for i in spec.layers}))
    tied = _tied(stage)
    if not spec.is_last:
        base.norm = nn.Identity()
        stage.lm_head = None
    if not spec.is_first and not (spec.is_last and tied):
        base.embed_tokens = None
    setattr(stage, STAGE_ATTR, spec)
    stage.forward = types.MethodType(stage_forward, stage)
    return stage


def _layer_container(base: nn.Module) -> tuple[str, nn.ModuleList]:
    first = decoder_layers(base)[0]
    for name, child in base.named_children():
        if isinstance(child, nn.ModuleList) and len(child) and child[0] is first:
            return name, child
    raise UsageError(
        f"{type(base).__name__}: its decoder layers are not a direct ModuleList; pipelining needs one"
    )


def _tied(model: nn.Module) -> bool:
    head = getattr(model, "lm_head", None)
    embed = model.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


def stage_forward(
    self: nn.Module,
    x: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token ids (first stage) or hidden states in; hidden states out, or on the last stage the loss as a
    1-element tensor (summed CE over the micro-batch's targets / the global batch's `num_items`)."""
    spec: StageSpec = getattr(self, STAGE_ATTR)
    stream = self.__dict__.get(TP_STREAM_ATTR)  # under tensor parallelism: the residual stream's layout
    if stream is not None and not spec.is_first:
        from torch.distributed.tensor import DTensor

        x = DTensor.from_local(x, stream[0], [stream[1]], run_check=False)
    inputs = {"input_ids": x} if spec.is_first else {"inputs_embeds": x}
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    if spec.is_last:
        # the class's forward: HF's, or overdrive's fused linear-CE when kernels are on
        out = type(self).forward(
            self, **inputs, labels=labels, use_cache=False, num_items_in_batch=spec.num_items
        )
        return out.loss.reshape(1)
    base = getattr(self, self.base_model_prefix)
    hidden = base(**inputs, use_cache=False).last_hidden_state
    return hidden.to_local() if stream is not None else hidden  # stages exchange plain (local) tensors


def is_stage(module: nn.Module) -> bool:
    return getattr(module, STAGE_ATTR, None) is not None


def check_pipeline(config: Any, n_stages: int, split: str | list[int]) -> None:
    """Fail before any process group starts when the model has too few layers for the stages."""
    n_layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    if n_stages > n_layers:
        raise UsageError(
            f"{n_stages} pipeline stages need at least {n_stages} decoder layers but the model has {n_layers}; "
            "lower pipeline_parallel or virtual_stages"
        )
    if split != "auto" and (len(split) != n_stages - 1 or split[-1] >= n_layers):
        raise UsageError(
            f"pipeline_split {split} must list {n_stages - 1} first-layer indices below {n_layers} for "
            f"{n_stages} stages"
        )


# ------------------------------------------------------------------------------------------------ parallelize


def split_model(model: nn.Module, strategy: Strategy, runtime: Runtime) -> list[nn.Module]:
    """This rank's stage modules of `model` (on meta), in stage order."""
    assert runtime.mesh is not None, "pipeline parallelism needs the device mesh (init_runtime builds it)"
    pp = runtime.dims.pp
    n_stages = pp * strategy.virtual_stages
    n_layers = len(decoder_layers(model))
    ranges = split_layers(n_layers, n_stages, strategy.pipeline_split, stage_costs(model))
    pp_rank = runtime.mesh["pp"].get_local_rank()
    ids = stages_of_rank(pp_rank, pp, strategy.virtual_stages, strategy.pipeline_schedule)
    return [build_stage(model, StageSpec(i, n_stages, ranges[i])) for i in ids]


def describe_split(model: nn.Module, strategy: Strategy, pp: int) -> str:
    n_stages = pp * strategy.virtual_stages
    ranges = split_layers(len(decoder_layers(model)), n_stages, strategy.pipeline_split, stage_costs(model))
    parts = [f"{r.start}-{r.stop - 1}" if len(r) > 1 else str(r.start) for r in ranges]
    return f"pipeline: {n_stages} stages ({strategy.pipeline_schedule}), layers " + " | ".join(parts)


def bubble_fraction(schedule: str, pp: int, n_micro: int, virtual: int = 1) -> float:
    """Idle share of a step in the textbook model (equal stage times): (P-1)/(M+P-1) for GPipe and 1F1B; V
    stages per rank shrink the ramp to (P-1)/V. For the zero-bubble schedules this is an upper bound: they
    fill part of the ramp with weight-gradient work."""
    if pp == 1:
        return 0.0
    ramp = (pp - 1) / virtual
    return ramp / (n_micro + ramp)
