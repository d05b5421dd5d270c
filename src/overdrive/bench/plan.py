"""Plan the overdrive cells of a bench: which strategy each column runs, on how many processes, and how its
global batch splits into micro-batches.

A column's strategy is the `--strategy` among its `overdrive train` flags (a preset name or a YAML file; none
means the single-process strategy). The strategy decides the launch: one process when it needs no process
group, `--nproc` otherwise; the tensor and pipeline degrees it gives those processes leave
`nproc / (tp × pp)` data-parallel ranks, over which the global batch is split exactly as `overdrive train`
splits it (`Strategy.resolve_batch`). Everything is checked here, before any input is prepared, so a strategy
that cannot run on the bench's processes fails with one line instead of one error cell per batch size.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from overdrive.bench.presets import SystemSpec, Workload
from overdrive.errors import UsageError

STRATEGY_FLAG = "--strategy"


def strategy_arg(args: tuple[str, ...]) -> str | None:
    """The value of the last `--strategy` in `args` (`--strategy X` or `--strategy=X`), as argparse reads it."""
    value = None
    for i, arg in enumerate(args):
        if arg == STRATEGY_FLAG:
            if i + 1 >= len(args):
                raise UsageError(
                    "--strategy at the end of the overdrive flags needs a value (a preset or YAML)"
                )
            value = args[i + 1]
        elif arg.startswith(STRATEGY_FLAG + "="):
            value = arg.split("=", 1)[1]
    return value


def replace_strategy_arg(args: tuple[str, ...], value: str) -> tuple[str, ...]:
    """`args` with every `--strategy` value replaced by `value` (cells run in their own directory, so a
    relative YAML path must become absolute)."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg == STRATEGY_FLAG and i + 1 < len(args):
            out += [STRATEGY_FLAG, value]
            skip = True
        elif arg.startswith(STRATEGY_FLAG + "="):
            out.append(f"{STRATEGY_FLAG}={value}")
        else:
            out.append(arg)
    return tuple(out)


def strategy_label(name_or_path: str) -> str:
    """What a strategy is called in a column name: the preset name, or a YAML file's stem."""
    from overdrive.parallel.strategy import PRESETS

    return name_or_path if name_or_path in PRESETS else Path(name_or_path).stem


def load_strategy(name_or_path: str | None) -> Any:  # -> Strategy (import kept lazy for a fast --help)
    from overdrive.parallel.strategy import Strategy

    return Strategy.from_name_or_path(name_or_path)


def degrees(strategy: Any, nproc: int) -> tuple[int, int]:
    """(tensor, pipeline) degrees the strategy gives `nproc` processes. Read through getattr so that strategies
    without a pipeline axis (or, in older code, a tensor axis) count as degree 1."""
    tp_degree = getattr(strategy, "tp_degree", None)
    tp = tp_degree(nproc) if callable(tp_degree) else getattr(strategy, "tensor_parallel", 1)
    pp_degree = getattr(strategy, "pp_degree", None)
    pp = pp_degree(nproc) if callable(pp_degree) else getattr(strategy, "pipeline_parallel", 1)
    tp = nproc if tp == -1 else tp
    pp = nproc // tp if pp == -1 else pp
    return int(tp), int(pp)


def processes_for(strategy: Any, nproc: int) -> int:
    """One process for a strategy that needs no process group (single); the bench's --nproc otherwise."""
    return nproc if strategy.is_distributed else 1


def plan_system(spec: SystemSpec, nproc: int) -> SystemSpec:
    """An overdrive column with its strategy resolved: processes, tp/pp degrees, and an absolute YAML path."""
    if spec.kind != "overdrive":
        return replace(spec, nproc=nproc)
    from overdrive.parallel.strategy import PRESETS

    name = strategy_arg(spec.extra_args)
    args = spec.extra_args
    if name is not None and name not in PRESETS and Path(name).expanduser().is_file():
        name = str(Path(name).expanduser().resolve())
        args = replace_strategy_arg(args, name)
    try:
        strategy = load_strategy(name)
        procs = processes_for(strategy, nproc)
        strategy.validate(procs)
    except UsageError as exc:
        raise UsageError(f"{spec.name} with --nproc {nproc}: {exc}") from None
    tp, pp = degrees(strategy, procs)
    if tp < 1 or pp < 1 or procs % (tp * pp):
        raise UsageError(
            f"{spec.name}: tensor {tp} × pipeline {pp} does not divide {procs} processes; change --nproc"
        )
    return replace(spec, extra_args=args, strategy=name or "single", nproc=procs, tp=tp, pp=pp)


def data_parallel_size(spec: SystemSpec, w: Workload) -> int:
    """Ranks that each take a different share of the global batch."""
    nproc = spec.nproc or w.nproc
    return max(1, nproc // (spec.tp * spec.pp))


def cell_batch(w: Workload, spec: SystemSpec, g: int) -> tuple[int, int]:
    """(micro batch, gradient accumulation) of a cell: the bench's micro batch (default: global / data-parallel
    ranks, no accumulation), unless the column's strategy pins its own, exactly as `overdrive train` decides."""
    dp = data_parallel_size(spec, w)
    if spec.kind != "overdrive":
        return w.micro_for(g, dp), w.accumulation_for(g, dp)
    try:
        micro, accum = load_strategy(spec.strategy).resolve_batch(g, dp, w.micro_for(g, dp))
    except UsageError as exc:
        raise UsageError(
            f"{spec.name} at global batch {g} ({dp} data-parallel rank(s)): {exc}; change --batch-sizes, "
            "--micro-batch-size or --nproc"
        ) from None
    return micro, accum


def plan_workload(w: Workload) -> Workload:
    """Every column planned and every cell's batch split checked, before anything runs."""
    systems = tuple(plan_system(s, w.nproc) for s in w.systems)
    planned = replace(w, systems=systems)
    for spec in systems:
        for g in planned.batch_sizes:
            cell_batch(planned, spec, g)
    return planned


def planned_row(spec: SystemSpec, w: Workload, g: int) -> dict[str, Any]:
    """A cell's row before it runs: its layout (seed 004's columns: tp, pp, micro batch, accumulation, global
    batch) and empty measurements; `run_cell` fills in the outcome."""
    micro, accum = cell_batch(w, spec, g)
    return {
        "system": spec.name,
        "kind": spec.kind,
        "strategy": spec.strategy,
        "global_batch_size": g,
        "micro_batch_size": micro,
        "accumulation_steps": accum,
        "nproc": spec.nproc or w.nproc,
        "tp": spec.tp,
        "pp": spec.pp,
        "dp": data_parallel_size(spec, w),
        "seq_len": w.seq_len,
        "status": "planned",
        "message": "",
        "tokens_per_sec": None,
        "tokens_per_sec_per_device": None,
        "tflops_per_device": None,
        "mfu": None,
        "peak_memory_bytes": None,
        "first_losses": [],
        "losses": [],
        "warmup_steps": w.warmup_steps,
        "measured_steps": w.steps,
        "measured_sec": None,
        "sec_per_iter": None,
    }


LAYOUT_KEYS = ("system", "strategy", "global_batch_size", "nproc", "tp", "pp", "dp", "micro_batch_size",
               "accumulation_steps")  # fmt: skip


def describe_cells(w: Workload) -> list[dict[str, Any]]:
    """Every cell's layout, for `--dry-run`: what would be launched, before anything is prepared."""
    return [
        {k: v for k, v in planned_row(spec, w, g).items() if k in LAYOUT_KEYS}
        for spec in w.systems
        for g in w.batch_sizes
    ]
