"""A distributed strategy as data: one dataclass, one field per axis, round-tripping through YAML.

A strategy says *how* a run is executed (data parallelism, engine, sharding, precision, recompute, compile),
never *what* is trained. Keeping it a flat record of axes lets a run be reproduced from its YAML, lets the
search sweep axes independently, and lets a strategy saved on N ranks be replayed on M ranks (`rescale`).

This module imports no torch so that the CLI can validate a strategy before any process group starts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

import yaml

from overdrive.core.dims import ParallelDims
from overdrive.errors import UsageError

DataParallel = Literal["none", "ddp", "fsdp", "hsdp"]
EngineKind = Literal["torch", "deepspeed"]
Offload = Literal["none", "optimizer", "optimizer+params"]
Dtype = Literal["fp32", "bf16"]
ActivationCheckpointing = Literal["none", "full", "selective", "every_k"]
PipelineSchedule = Literal["gpipe", "1f1b", "interleaved-1f1b", "interleaved-zero-bubble", "zbv-zero-bubble"]
# rows per forward pass when neither the strategy nor the run sets one (capped by each rank's rows)
DEFAULT_MICRO_BATCH = 8
# Schedules that run several (virtual) stages per rank, and the V-shaped one (stages r and 2P-1-r on rank r).
MULTI_STAGE_SCHEDULES = ("interleaved-1f1b", "interleaved-zero-bubble", "zbv-zero-bubble")

PRESETS: tuple[str, ...] = (
    "single",
    "ddp",
    "fsdp",
    "zero2",
    "zero3",
    "zero3-offload",
    "deepspeed-zero1",
    "deepspeed-zero2",
    "deepspeed-zero3",
    "deepspeed-zero3-offload",
    "tp",
    "fsdp-tp",
    "pp",
    "pp-fsdp",
)


def default_micro(per_rank: int, stages: int = 1) -> int:
    """The micro batch when neither the strategy nor the run sets one: the largest divisor of the rank's rows
    up to DEFAULT_MICRO_BATCH, leaving a pipeline at least one micro-batch per stage where the rows allow."""
    per_rank = max(1, per_rank)
    divisors = [d for d in range(min(DEFAULT_MICRO_BATCH, per_rank), 0, -1) if per_rank % d == 0]
    return next((d for d in divisors if per_rank // d >= stages), divisors[-1])


@dataclass
class Strategy:
    """How a run is executed. Every field is an independent axis; `validate` rejects bad combinations."""

    data_parallel: DataParallel = "none"
    # FSDP2: True reshards parameters after forward (ZeRO-3), False keeps them gathered until backward (ZeRO-2);
    # None: True, except under pipeline parallelism (each stage's parameters serve several micro-batches).
    reshard_after_forward: bool | None = None
    # HSDP: ranks per shard group; the world is a (world // shard_size) replicate × shard_size shard mesh.
    shard_size: int | None = None
    engine: EngineKind = "torch"
    zero_stage: int | None = None  # DeepSpeed only; None means 0 (plain data parallel) under deepspeed
    offload: Offload = "none"
    param_dtype: Dtype = "fp32"  # dtype of parameters during forward/backward (FSDP2 / DeepSpeed bf16)
    reduce_dtype: Dtype = "fp32"  # dtype gradients are reduced in across ranks
    activation_checkpointing: ActivationCheckpointing = "none"
    ac_every: int = 1  # with every_k: recompute decoder layers 0, k, 2k, ... (counted from 0)
    activation_offload: bool = False  # keep saved activations in host memory (save_on_cpu) until backward
    fp8: bool = False  # fp8 linear layers (torchao float8 training; CUDA compute capability >= 8.9)
    compile: bool = False  # torch.compile each decoder layer (in place, parameter names unchanged)
    kernels: bool = False  # swap in overdrive's fused kernels before anything else
    micro_batch_size: int | None = None  # rows per forward pass; None: the run config decides
    grad_accumulation: int | None = None  # micro-batches per rank per step; None: derived from global batch
    # Ranks per tensor-parallel group (-1: all ranks); data parallelism runs over world / tensor_parallel.
    tensor_parallel: int = 1
    sequence_parallel: bool = True  # with tensor parallelism: norms and dropout on sequence shards
    # Pipeline stages (ranks per pipeline, -1: all ranks); the model's decoder layers are split between them.
    pipeline_parallel: int = 1
    pipeline_schedule: PipelineSchedule = "1f1b"
    virtual_stages: int = 1  # stages per rank: 2+ for the interleaved schedules, exactly 2 for zbv-zero-bubble
    # "auto" balances parameters over the stages; a list gives the first layer of every stage after the first.
    pipeline_split: str | list[int] = "auto"

    # ---------------------------------------------------------------- YAML

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "strategy") -> Strategy:
        """Build from a mapping, rejecting unknown keys and values outside each axis' choices."""
        if not isinstance(data, dict):
            raise UsageError(f"{source} must be a mapping of axis: value")
        hints = get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise UsageError(f"unknown key '{key}' in {source}; valid keys: {', '.join(sorted(known))}")
            values[name] = _coerce(name, value, hints[name], source)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> Strategy:
        """Read a strategy from a YAML file (a Path, or a string naming an existing file) or from YAML text."""
        source = "strategy YAML"
        text = str(path_or_text)
        path = Path(text)
        is_file = isinstance(path_or_text, Path) or ("\n" not in text and path.is_file())
        if is_file or ("\n" not in text and path.suffix in (".yaml", ".yml")):
            if not path.is_file():
                raise UsageError(
                    f"strategy file {path} not found; pass a preset name or an existing YAML file"
                )
            source, text = str(path), path.read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise UsageError(f"{source} is not valid YAML{at}; fix the syntax") from None
        return cls.from_dict(data or {}, source)

    @classmethod
    def from_name_or_path(cls, name_or_path: str | Path | None) -> Strategy:
        """A preset name (see PRESETS), a YAML file, or None for the single-process strategy."""
        if name_or_path is None:
            return cls()
        text = str(name_or_path)
        if text in PRESETS:
            preset = resources.files("overdrive.parallel").joinpath("presets", f"{text}.yaml")
            return cls.from_dict(yaml.safe_load(preset.read_text()) or {}, f"preset {text}")
        if Path(text).is_file():
            return cls.from_yaml(Path(text))
        raise UsageError(
            f"strategy '{text}' is neither a preset nor a YAML file; presets: {', '.join(PRESETS)}"
        )

    # ---------------------------------------------------------------- meaning

    @property
    def resolved_zero_stage(self) -> int:
        return 0 if self.zero_stage is None else self.zero_stage

    @property
    def is_distributed(self) -> bool:
        """Whether this strategy needs a process group (even on one rank)."""
        return (
            self.data_parallel != "none"
            or self.engine == "deepspeed"
            or self.tensor_parallel != 1
            or self.pipeline_parallel != 1
        )

    @property
    def resolved_reshard_after_forward(self) -> bool:
        if self.reshard_after_forward is None:
            return self.pipeline_parallel == 1
        return self.reshard_after_forward

    def tp_degree(self, world_size: int) -> int:
        return world_size if self.tensor_parallel == -1 else self.tensor_parallel

    def pp_degree(self, world_size: int) -> int:
        return world_size if self.pipeline_parallel == -1 else self.pipeline_parallel

    def dp_degree(self, world_size: int) -> int:
        """Data-parallel ranks: the world divided by the tensor and pipeline degrees."""
        return max(1, world_size // (self.tp_degree(world_size) * self.pp_degree(world_size)))

    def resolved_for(self, world_size: int) -> Strategy:
        """This strategy with the "all ranks" degrees (-1) replaced by numbers for `world_size` ranks."""
        return dataclasses.replace(
            self, tensor_parallel=self.tp_degree(world_size), pipeline_parallel=self.pp_degree(world_size)
        )

    @property
    def num_stages_per_rank(self) -> int:
        return self.virtual_stages if self.pipeline_parallel != 1 else 1

    def parallel_dims(self, world_size: int) -> ParallelDims:
        """The mesh degrees this strategy gives `world_size` ranks (validated first)."""
        self.validate(world_size)
        tp, pp = self.tp_degree(world_size), self.pp_degree(world_size)
        dp = self.dp_degree(world_size)
        if self.data_parallel == "hsdp":
            shard = self.shard_size or dp
            return ParallelDims(dp_replicate=dp // shard, dp_shard=shard, tp=tp, pp=pp)
        if self.data_parallel == "ddp" and self.engine == "torch":
            return ParallelDims(dp_replicate=dp, tp=tp, pp=pp)
        return ParallelDims(dp_shard=dp, tp=tp, pp=pp)

    def describe(self) -> str:
        """One line for logs: what actually runs."""
        if self.engine == "deepspeed":
            parts = [f"deepspeed ZeRO-{self.resolved_zero_stage}"]
        elif self.data_parallel in ("fsdp", "hsdp"):
            zero = "ZeRO-3" if self.resolved_reshard_after_forward else "ZeRO-2"
            shard = f" shard {self.shard_size}" if self.data_parallel == "hsdp" else ""
            parts = [f"{self.data_parallel} ({zero}{shard})"]
        else:
            parts = [self.data_parallel if self.data_parallel != "none" else "single process"]
        if self.tensor_parallel != 1:
            degree = "all ranks" if self.tensor_parallel == -1 else str(self.tensor_parallel)
            parts.append(
                f"tensor parallel {degree}" + (" + sequence parallel" if self.sequence_parallel else "")
            )
        if self.pipeline_parallel != 1:
            degree = "all ranks" if self.pipeline_parallel == -1 else str(self.pipeline_parallel)
            virtual = f" × {self.virtual_stages} virtual" if self.virtual_stages != 1 else ""
            parts.append(f"pipeline {degree}{virtual} ({self.pipeline_schedule})")
        if self.offload != "none":
            parts.append(f"offload {self.offload}")
        if self.param_dtype != "fp32" or self.reduce_dtype != "fp32":
            parts.append(f"params {self.param_dtype} reduce {self.reduce_dtype}")
        if self.activation_checkpointing != "none":
            every = f" every {self.ac_every}" if self.activation_checkpointing == "every_k" else ""
            parts.append(f"AC {self.activation_checkpointing}{every}")
        if self.activation_offload:
            parts.append("activation offload")
        if self.fp8:
            parts.append("fp8")
        if self.compile:
            parts.append("compile")
        if self.kernels:
            parts.append("kernels")
        return ", ".join(parts)

    # ---------------------------------------------------------------- validation

    def validate(self, world_size: int, global_batch_size: int | None = None) -> None:
        """Raise a one-line UsageError for any combination that cannot run; call before init_process_group."""
        fix = _first_problem(self, world_size)
        if fix:
            raise UsageError(f"strategy: {fix}")
        if global_batch_size is not None:
            self.resolved_for(world_size).resolve_batch(global_batch_size, self.dp_degree(world_size))

    def resolve_batch(
        self, global_batch_size: int, world_size: int, micro_batch_size: int | None = None
    ) -> tuple[int, int]:
        """(micro batch, accumulation steps per rank) that multiply to the global batch over `world_size`
        data-parallel ranks (tensor-parallel ranks share their data-parallel rank's batch).

        `micro_batch_size` is the run config's value, used when the strategy does not pin one.
        """
        micro = self.micro_batch_size or micro_batch_size
        if global_batch_size % world_size:
            raise UsageError(
                f"--global-batch-size {global_batch_size} must be a multiple of the {world_size} data-parallel "
                f"ranks; use a multiple of {world_size}"
            )
        per_rank = global_batch_size // world_size
        if micro is None:
            if self.grad_accumulation is None or per_rank % self.grad_accumulation:
                micro = default_micro(per_rank, max(1, self.pipeline_parallel))
            else:
                micro = per_rank // self.grad_accumulation
            accum = per_rank // micro
            self._check_pipeline_batches(accum, micro)
            return micro, accum
        if per_rank % micro:
            ranks = "" if world_size == 1 else f" × {world_size} data-parallel ranks"
            raise UsageError(
                f"--global-batch-size {global_batch_size} must be a multiple of --micro-batch-size {micro}{ranks}; "
                f"choose a multiple of {micro * world_size}"
            )
        accum = per_rank // micro
        if self.grad_accumulation is not None and self.grad_accumulation != accum:
            raise UsageError(
                f"grad_accumulation {self.grad_accumulation} × micro batch {micro} × world size {world_size} "
                f"!= global batch size {global_batch_size}; drop grad_accumulation to derive it ({accum})"
            )
        self._check_pipeline_batches(accum, micro)
        return micro, accum

    def _check_pipeline_batches(self, n_micro: int, micro: int) -> None:
        """A pipeline step runs the rank's micro-batches through the stages: enough to fill the pipeline."""
        pp = self.pipeline_parallel
        if pp == 1 or pp == -1:  # -1 is checked once the world size is known (parallel_dims)
            return
        if n_micro < pp:
            raise UsageError(
                f"pipeline_parallel {pp} needs at least {pp} micro-batches per step but the global batch gives "
                f"{n_micro} (micro batch {micro}); raise --global-batch-size or lower --micro-batch-size"
            )
        rounds = max(1, n_micro // pp)
        if self.pipeline_schedule in MULTI_STAGE_SCHEDULES and n_micro % rounds:
            raise UsageError(
                f"{self.pipeline_schedule} runs micro-batches in rounds of {pp}; {n_micro} per step is not a "
                f"multiple of {rounds} rounds; use a multiple of {pp} micro-batches"
            )

    def rescale(self, old_world: int, new_world: int, global_batch_size: int) -> Strategy:
        """This strategy for `new_world` ranks with the same global batch (saved on N ranks, resumed on M).

        The data-parallel size follows the world size; the micro batch is kept when it still divides the
        per-rank batch (memory is sized for it) and otherwise lowered to the largest divisor that does;
        grad_accumulation is recomputed.
        """
        if new_world < 1 or old_world < 1:
            raise UsageError(f"world sizes must be positive, got {old_world} -> {new_world}")
        if self.data_parallel == "none" and self.engine == "torch" and new_world > 1:
            raise UsageError(
                f"strategy has no data parallelism and cannot run on {new_world} ranks; pick a data-parallel "
                "strategy such as ddp or fsdp"
            )
        if global_batch_size % new_world:
            raise UsageError(
                f"global batch size {global_batch_size} cannot be split over {new_world} ranks (saved on "
                f"{old_world}); resume on a world size that divides {global_batch_size}"
            )
        per_rank = global_batch_size // new_world
        changes: dict[str, Any] = {}
        if self.micro_batch_size is not None:
            micro = min(self.micro_batch_size, per_rank)
            while per_rank % micro:
                micro -= 1
            changes["micro_batch_size"] = micro
            changes["grad_accumulation"] = per_rank // micro
        elif self.grad_accumulation is not None:
            old_per_rank = global_batch_size // old_world if global_batch_size % old_world == 0 else None
            micro = old_per_rank // self.grad_accumulation if old_per_rank else None
            changes["grad_accumulation"] = per_rank // micro if micro and per_rank % micro == 0 else None
        if self.data_parallel == "hsdp" and self.shard_size and new_world % self.shard_size:
            raise UsageError(
                f"hsdp shard_size {self.shard_size} does not divide the new world size {new_world}; set "
                f"shard_size to a divisor of {new_world}"
            )
        rescaled = dataclasses.replace(self, **changes)
        rescaled.validate(new_world)
        return rescaled


def _first_problem(s: Strategy, world_size: int) -> str | None:
    """The first reason this strategy cannot run, with its fix, or None. Order: most basic first."""
    if world_size < 1:
        return f"world size must be positive, got {world_size}"
    if s.engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        return "engine deepspeed needs DeepSpeed; install it with pip install 'overdrive[deepspeed]'"
    if s.engine == "torch" and s.zero_stage is not None:
        return (
            "zero_stage applies to engine: deepspeed; with engine: torch use data_parallel: fsdp "
            "(ZeRO-3) or fsdp with reshard_after_forward: false (ZeRO-2)"
        )
    if s.zero_stage is not None and s.zero_stage not in (0, 1, 2, 3):
        return f"zero_stage must be 0, 1, 2 or 3, got {s.zero_stage}"
    if s.engine == "deepspeed" and s.data_parallel != "ddp":
        return (
            f"engine deepspeed shards through zero_stage, not data_parallel: {s.data_parallel}; set "
            "data_parallel: ddp"
        )
    tp_problem = _tensor_parallel_problem(s, world_size)
    if tp_problem:
        return tp_problem
    pp_problem = _pipeline_problem(s, world_size)
    if pp_problem:
        return pp_problem
    dp_world = s.dp_degree(world_size)
    if s.data_parallel == "none" and dp_world > 1:
        return (
            f"data_parallel: none runs one data-parallel rank but {world_size} ranks were launched for tensor "
            f"parallel {s.tp_degree(world_size)} × pipeline {s.pp_degree(world_size)}; use a data-parallel "
            "strategy (ddp, fsdp), raise tensor_parallel or pipeline_parallel, or launch fewer processes"
        )
    if s.data_parallel == "hsdp":
        if not s.shard_size or s.shard_size < 1:
            return "hsdp needs shard_size (ranks per shard group), e.g. the GPUs per node"
        if dp_world % s.shard_size:
            return f"hsdp shard_size {s.shard_size} must divide the data-parallel size {dp_world}"
    elif s.shard_size is not None:
        return f"shard_size applies to data_parallel: hsdp only, not {s.data_parallel}"
    if s.reshard_after_forward is False and s.data_parallel not in ("fsdp", "hsdp"):
        return "reshard_after_forward: false (ZeRO-2) applies to data_parallel fsdp or hsdp"
    if s.offload != "none":
        if s.engine == "torch" and s.data_parallel not in ("fsdp", "hsdp"):
            return f"offload needs data_parallel fsdp/hsdp or engine deepspeed, not {s.data_parallel}"
        if s.engine == "torch" and s.offload == "optimizer":
            return (
                "FSDP2 offloads parameters, gradients and optimizer state together; use offload: "
                "optimizer+params, or engine: deepspeed for optimizer-only offload"
            )
        if s.engine == "deepspeed" and s.resolved_zero_stage == 0:
            return "DeepSpeed offload needs zero_stage 1, 2 or 3"
        if s.engine == "deepspeed" and s.offload == "optimizer+params" and s.resolved_zero_stage != 3:
            return "DeepSpeed parameter offload needs zero_stage 3; use offload: optimizer for stages 1-2"
    if s.param_dtype == "bf16" and s.engine == "torch" and s.data_parallel in ("none", "ddp"):
        return (
            f"param_dtype bf16 needs fsdp/hsdp or deepspeed; with {s.data_parallel} keep fp32 parameters and "
            "train with precision bf16 (autocast)"
        )
    if s.reduce_dtype == "bf16" and s.data_parallel == "none":
        return "reduce_dtype applies only when gradients are reduced across ranks; set data_parallel"
    if s.ac_every < 1:
        return f"ac_every must be at least 1, got {s.ac_every}"
    if s.activation_checkpointing != "every_k" and s.ac_every != 1:
        return "ac_every applies to activation_checkpointing: every_k only"
    if s.fp8 and s.engine == "deepspeed":
        return "fp8 works with engine torch (single, ddp, fsdp); drop fp8 or use data_parallel: fsdp"
    if s.fp8 and importlib.util.find_spec("torchao") is None:
        return "fp8 needs torchao and a CUDA GPU with fp8 (compute capability 8.9+); pip install 'overdrive[gpu]'"
    for name in ("micro_batch_size", "grad_accumulation"):
        value = getattr(s, name)
        if value is not None and value < 1:
            return f"{name} must be positive, got {value}"
    return None


def _tensor_parallel_problem(s: Strategy, world_size: int) -> str | None:
    """Why the tensor-parallel degree cannot run on `world_size` ranks with this strategy, or None."""
    if s.tensor_parallel == 1:
        return None
    if s.tensor_parallel < 1 and s.tensor_parallel != -1:
        return f"tensor_parallel must be a positive degree or -1 (all ranks), got {s.tensor_parallel}"
    if s.engine == "deepspeed":
        return (
            "tensor_parallel works with engine torch (FSDP2 or none), not deepspeed; use the fsdp-tp preset"
        )
    if s.data_parallel == "ddp":
        return "tensor_parallel with ddp is not supported; use data_parallel: fsdp (the fsdp-tp preset)"
    if s.offload != "none":
        return "offload is not supported with tensor_parallel; drop offload or tensor_parallel"
    tp = s.tp_degree(world_size)
    if world_size % tp:
        return (
            f"tensor_parallel {tp} must divide the world size {world_size}; launch a multiple of {tp} ranks"
        )
    return None


def _pipeline_problem(s: Strategy, world_size: int) -> str | None:
    """Why the pipeline settings cannot run on `world_size` ranks, or None."""
    virtual_problem = _virtual_stage_problem(s)
    if virtual_problem:
        return virtual_problem
    split_problem = _split_problem(s.pipeline_split)
    if split_problem:
        return split_problem
    if s.pipeline_parallel == 1:
        return None
    if s.pipeline_parallel < 1 and s.pipeline_parallel != -1:
        return f"pipeline_parallel must be a positive degree or -1 (all ranks), got {s.pipeline_parallel}"
    if s.engine == "deepspeed":
        return "pipeline_parallel works with engine torch (FSDP2 or none), not deepspeed; use the pp-fsdp preset"
    if s.data_parallel == "ddp":
        return (
            "pipeline_parallel with ddp is not supported; use data_parallel: fsdp (the pp-fsdp preset keeps "
            "parameters gathered across micro-batches, as DDP does)"
        )
    if s.offload != "none":
        return "offload is not supported with pipeline_parallel; drop offload or pipeline_parallel"
    pp_tp = s.pp_degree(world_size) * s.tp_degree(world_size)
    if world_size % pp_tp:
        return (
            f"pipeline {s.pp_degree(world_size)} × tensor {s.tp_degree(world_size)} = {pp_tp} must divide the "
            f"world size {world_size}; launch a multiple of {pp_tp} ranks"
        )
    return None


def _virtual_stage_problem(s: Strategy) -> str | None:
    if s.virtual_stages < 1:
        return f"virtual_stages must be at least 1, got {s.virtual_stages}"
    if s.pipeline_parallel == 1:
        if s.virtual_stages != 1 or s.pipeline_schedule != "1f1b":
            return "pipeline_schedule and virtual_stages apply with pipeline_parallel > 1 only"
        return None
    multi = s.pipeline_schedule in MULTI_STAGE_SCHEDULES
    if s.pipeline_schedule == "zbv-zero-bubble" and s.virtual_stages != 2:
        return "zbv-zero-bubble runs exactly 2 stages per rank; set virtual_stages: 2"
    if multi and s.virtual_stages < 2:
        return f"{s.pipeline_schedule} interleaves several stages per rank; set virtual_stages: 2 or more"
    if not multi and s.virtual_stages != 1:
        return (
            f"{s.pipeline_schedule} runs one stage per rank; use pipeline_schedule: interleaved-1f1b for "
            f"virtual_stages: {s.virtual_stages}"
        )
    return None


def _split_problem(split: Any) -> str | None:
    if split == "auto":
        return None
    if not isinstance(split, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in split):
        return f"pipeline_split must be auto or a list of layer indices, got {split!r}"
    if any(b <= a for a, b in zip(split, split[1:], strict=False)) or (split and split[0] < 1):
        return f"pipeline_split {split} must list increasing layer indices above 0 (the first layer of each stage)"
    return None


def _coerce(name: str, value: Any, tp: Any, source: str) -> Any:
    """Check one YAML value against the field's annotated type."""
    if name == "pipeline_split":
        return value  # "auto" or a list of ints: checked by validate()
    args = get_args(tp)
    literals = [a for a in args if isinstance(a, str)]
    if literals:
        if value not in literals:
            raise UsageError(f"{name} in {source} must be one of {', '.join(literals)}, got {value!r}")
        return value
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), tp)
    if value is None:
        if optional:
            return None
        raise UsageError(f"{name} in {source} must not be empty")
    if base is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{name} in {source} must be true or false, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{name} in {source} must be a whole number, got {value!r}")
        return value
    return value
