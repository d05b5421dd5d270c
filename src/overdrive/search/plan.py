"""`overdrive plan`: every valid strategy for a model, sequence, global batch and hardware, predicted and ranked.

Candidates are built over every axis a Strategy has (data-parallel kind and ZeRO stage, tensor and pipeline
degrees, micro-batch, recompute mode, offload, precision, kernels, compile); each must pass
`Strategy.validate(world, global_batch)`. Each gets the memory model's per-device peak and the time model's step
time; the fitting ones are ranked by time. The table shows the top N and, for every data-parallel layout, its
leanest variant, so the user also sees what does *not* fit.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_type_hints

from overdrive.errors import UsageError
from overdrive.parallel.strategy import Strategy
from overdrive.search.hardware import Device
from overdrive.search.layout import Layout
from overdrive.search.memory import MemoryEstimate, estimate
from overdrive.search.shape import ModelShape
from overdrive.search.timing import TimeEstimate, estimate_time

# (label, strategy fields) of each data-parallel layout
DP_KINDS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("no data parallel", {"data_parallel": "none"}),
    ("ddp", {"data_parallel": "ddp"}),
    ("fsdp zero-3", {"data_parallel": "fsdp", "reshard_after_forward": True}),
    ("fsdp zero-2", {"data_parallel": "fsdp", "reshard_after_forward": False}),
    ("hsdp zero-3", {"data_parallel": "hsdp", "reshard_after_forward": True}),
    ("deepspeed zero-1", {"data_parallel": "ddp", "engine": "deepspeed", "zero_stage": 1}),
    ("deepspeed zero-2", {"data_parallel": "ddp", "engine": "deepspeed", "zero_stage": 2}),
    ("deepspeed zero-3", {"data_parallel": "ddp", "engine": "deepspeed", "zero_stage": 3}),
)


@dataclass
class Candidate:
    """One strategy with its batch split and predictions."""

    kind: str
    strategy: Strategy
    precision: str
    micro: int
    accum: int
    memory: MemoryEstimate
    time: TimeEstimate
    fits: bool

    def tokens_per_second_per_device(self, seq: int, global_batch: int, world: int) -> float:
        return global_batch * seq / max(self.time.total, 1e-12) / world

    def to_dict(self, seq: int, global_batch: int, world: int) -> dict[str, Any]:
        return {
            "layout": self.kind,
            "strategy": {k: v for k, v in self.strategy.to_dict().items()},
            "describe": self.strategy.describe(),
            "precision": self.precision,
            "micro_batch_size": self.micro,
            "grad_accumulation": self.accum,
            "memory": self.memory.to_dict(),
            "time": self.time.to_dict(),
            "tokens_per_sec_per_device": self.tokens_per_second_per_device(seq, global_batch, world),
            "fits": self.fits,
        }


def recompute_modes() -> list[str]:
    """The recompute values this Strategy accepts (selective where it exists)."""
    hint = get_type_hints(Strategy)["activation_checkpointing"]
    values = [v for v in get_args(hint) if isinstance(v, str)]
    return [v for v in ("none", "selective", "every_k", "full") if v in values]


def divisors(n: int, limit: int) -> list[int]:
    return [d for d in (1, 2, 4, 8, 16, 32, 64) if d <= limit and n % d == 0]


def tp_degrees(shape: ModelShape, gpus_per_node: int, world: int) -> list[int]:
    """Tensor degrees inside one node that split heads, kv heads, MLP and vocabulary evenly."""
    dims = (shape.heads, shape.kv_heads, shape.intermediate, shape.vocab)
    return [t for t in divisors(world, min(gpus_per_node, world)) if all(d % t == 0 for d in dims)]


def pp_degrees(shape: ModelShape, world: int) -> list[int]:
    if "pipeline_parallel" not in {f.name for f in dataclasses.fields(Strategy)}:
        return [1]
    return [p for p in divisors(world, min(world, 8)) if shape.layers >= 2 * p]


def candidates(
    shape: ModelShape, seq: int, global_batch: int, device: Device, world: int, gpus_per_node: int
) -> Iterator[tuple[str, Strategy, str, int, int]]:
    """(layout label, strategy, precision, micro, accumulation) for every valid combination."""
    # GPUs with bf16 run it faster and leaner than fp32 (overdrive's --precision auto); a CPU may not
    precisions = ["bf16"] if device.cuda and device.bf16_flops > device.fp32_flops else ["bf16", "fp32"]
    checked: dict[str, bool] = {}
    for (kind, fields), tp, pp in itertools.product(
        DP_KINDS, tp_degrees(shape, gpus_per_node, world), pp_degrees(shape, world)
    ):
        dp = world // (tp * pp)
        if dp < 1 or global_batch % dp:
            continue
        if kind.startswith("hsdp") and (dp <= gpus_per_node or dp % gpus_per_node):
            continue
        per_rank = global_batch // dp
        for precision, recompute, kernels, compile_, offload, micro in itertools.product(
            precisions,
            recompute_modes(),
            (True, False),
            (True, False),
            offload_choices(kind, device),
            [m for m in (1, 2, 4, 8, 16, 32) if per_rank % m == 0],
        ):
            extra: dict[str, Any] = dict(fields)
            if kind.startswith("hsdp"):
                extra["shard_size"] = gpus_per_node
            if pp > 1:
                extra["pipeline_parallel"] = pp
            if precision == "bf16" and (kind.startswith(("fsdp", "hsdp", "deepspeed"))):
                extra["param_dtype"] = "bf16"
            strategy = Strategy(
                **extra,
                tensor_parallel=tp,
                activation_checkpointing=recompute,
                ac_every=2 if recompute == "every_k" else 1,
                kernels=kernels,
                compile=compile_,
                offload=offload,
                micro_batch_size=micro,
            )
            if not valid(strategy, world, global_batch, checked):
                continue
            yield kind, strategy, precision, micro, per_rank // micro


def valid(strategy: Strategy, world: int, global_batch: int, checked: dict[str, bool]) -> bool:
    """`Strategy.validate(world, global_batch)`, run once per combination of the axes it checks: kernels and
    compile are switched on in place of the checked strategy (validate looks up installed packages, which is
    what makes thousands of calls slow)."""
    key = repr(dataclasses.replace(strategy, kernels=False, compile=False))
    if key not in checked:
        try:
            strategy.validate(world, global_batch)
            checked[key] = True
        except UsageError:
            checked[key] = False
    return checked[key]


def offload_choices(kind: str, device: Device) -> tuple[str, ...]:
    if not device.cuda:
        return ("none",)  # offloading to the host saves nothing when the host is the device
    if kind.startswith(("fsdp", "hsdp")):
        return ("none", "optimizer+params")
    if kind == "deepspeed zero-3":
        return ("none", "optimizer", "optimizer+params")
    if kind.startswith("deepspeed"):
        return ("none", "optimizer")
    return ("none",)


def plan(
    shape: ModelShape,
    seq: int,
    global_batch: int,
    device: Device,
    nodes: int,
    gpus_per_node: int,
    lora_rank: int = 0,
) -> list[Candidate]:
    """Every valid candidate, predicted; fitting ones first by step time, then the rest by peak memory.

    `lora_rank` > 0 plans LoRA fine-tuning (all-linear adapters, frozen base; no tensor parallelism)."""
    world = nodes * gpus_per_node
    out = []
    memo: dict[Layout, MemoryEstimate] = {}
    for kind, strategy, precision, micro, accum in candidates(
        shape, seq, global_batch, device, world, gpus_per_node
    ):
        if lora_rank and strategy.tensor_parallel != 1:
            continue  # adapters do not run under tensor parallelism (overdrive.parallel.adapters)
        layout = Layout.from_strategy(strategy, world, micro, accum, precision, lora_rank)
        key = dataclasses.replace(layout, compile=False)  # compiling changes time, not the memory model
        if key not in memo:
            memo[key] = estimate(shape, layout, seq, cuda=device.cuda)
        memory = memo[key]
        time = estimate_time(shape, layout, seq, global_batch, device, gpus_per_node)
        fits = memory.reserved <= device.memory_bytes
        out.append(Candidate(kind, strategy, precision, micro, accum, memory, time, fits))
    if not out:
        raise UsageError(
            f"no strategy can split --global-batch-size {global_batch} over {world} devices; use a multiple "
            f"of {world}"
        )
    out.sort(key=lambda c: (not c.fits, c.time.total if c.fits else c.memory.reserved))
    return out


def shown(ranked: list[Candidate], top: int) -> list[Candidate]:
    """The top N, then each layout's best (fastest fitting, else leanest) that is not already there."""
    rows = ranked[:top]
    for kind, _ in DP_KINDS:
        best = next((c for c in ranked if c.kind == kind), None)
        if best is not None and best not in rows:
            rows.append(best)
    return rows


def write_json(
    path: Path, ranked: list[Candidate], meta: dict[str, Any], seq: int, gb: int, world: int
) -> None:
    data = {
        **meta,
        "count": len(ranked),
        "fitting": sum(c.fits for c in ranked),
        "candidates": [c.to_dict(seq, gb, world) for c in ranked[:200]],
    }
    path.write_text(json.dumps(data, indent=1))
