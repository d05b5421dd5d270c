"""Plan the overdrive cells of a bench: which strategy each column runs, on how many processes, and how its
global batch splits into micro-batches.

A column's strategy is the `--strategy` among its `overdrive train` flags (a preset name or a YAML file; none
means the single-process strategy). The strategy decides the launch: one process when it needs no process
group, `--nproc` otherwise; the tensor and pipeline degrees it gives those processes leave
`nproc / (tp × pp)` data-parallel ranks, over which the global batch is split exactly as `overdrive train`
splits it (`Strategy.resolve_batch`). A pipeline cell needs enough micro-batches per step to fill its stages, so
unless a micro batch is given its micro batch is the largest one that yields them.

Everything is checked here, before any input is prepared. A column whose strategy cannot run on the bench's
processes, or a cell whose batch cannot be split for it, is planned as skipped with the reason (the other cells
still run); a bench in which no cell at all can run fails with one line.
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

    if name_or_path == "auto":  # the run decides (overdrive.search.auto): planned as data parallel on --nproc
        return Strategy(data_parallel="ddp")
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


def resolved(strategy: Any, nproc: int) -> Any:
    """The strategy with its "all ranks" degrees (-1) made numbers for `nproc` processes, so that its batch
    checks (micro-batches per pipeline step) see the real pipeline degree."""
    resolve = getattr(strategy, "resolved_for", None)
    return resolve(nproc) if callable(resolve) else strategy


def layout_problem(strategy: Any, procs: int, nproc: int) -> str:
    """Why the strategy cannot run on `procs` processes ('' when it can), as one line with the fix."""
    try:
        strategy.validate(procs)
    except UsageError as exc:
        return str(exc)
    tp, pp = degrees(strategy, procs)
    if tp < 1 or pp < 1 or procs % (tp * pp):
        return f"tensor {tp} × pipeline {pp} does not divide {procs} processes; change --nproc"
    if getattr(strategy, "pipeline_parallel", 1) != 1 and pp < 2:
        return f"a pipeline needs at least 2 stages but --nproc {nproc} gives {pp}; pass --nproc 2 or more"
    return ""


def plan_system(spec: SystemSpec, nproc: int) -> SystemSpec:
    """An overdrive column with its strategy resolved: processes, tp/pp degrees, and an absolute YAML path; a
    strategy that cannot run on these processes gives a column with `skip` set (an unknown strategy is an
    input error)."""
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
    except UsageError as exc:
        raise UsageError(f"{spec.name}: {exc}") from None
    procs = processes_for(strategy, nproc)
    problem = layout_problem(strategy, procs, nproc)
    tp, pp = degrees(strategy, procs)
    planned = replace(spec, extra_args=args, strategy=name or "auto", nproc=procs, tp=tp, pp=pp)
    return replace(planned, skip=f"{spec.name} with --nproc {nproc}: {problem}") if problem else planned


def data_parallel_size(spec: SystemSpec, w: Workload) -> int:
    """Ranks that each take a different share of the global batch."""
    nproc = spec.nproc or w.nproc
    return max(1, nproc // (spec.tp * spec.pp))


def divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def pipeline_batch(strategy: Any, g: int, dp: int, micro: int | None) -> tuple[int, int]:
    """(micro batch, micro-batches per step) of a pipeline cell: the given micro batch, else the largest one
    that still gives the pipeline enough micro-batches (closest to the other columns' micro batch)."""
    if micro is not None or getattr(strategy, "micro_batch_size", None) or g % dp:
        return strategy.resolve_batch(g, dp, micro)
    last: UsageError | None = None
    for m in divisors_desc(g // dp):
        try:
            return strategy.resolve_batch(g, dp, m)
        except UsageError as exc:
            last = exc
    assert last is not None
    raise last


def cell_batch(w: Workload, spec: SystemSpec, g: int) -> tuple[int, int]:
    """(micro batch, gradient accumulation) of a cell: the bench's micro batch (default: global / data-parallel
    ranks, no accumulation), unless the column's strategy pins its own, exactly as `overdrive train` decides; a
    pipeline cell's accumulation is its micro-batches per step (see `pipeline_batch`)."""
    dp = data_parallel_size(spec, w)
    if spec.kind != "overdrive":
        return w.micro_for(g, dp), w.accumulation_for(g, dp)
    strategy = resolved(load_strategy(spec.strategy), spec.nproc or w.nproc)
    try:
        if spec.pp > 1:
            return pipeline_batch(strategy, g, dp, w.micro_batch_size)
        return strategy.resolve_batch(g, dp, w.micro_for(g, dp))
    except UsageError as exc:
        raise UsageError(
            f"{spec.name} at global batch {g} ({dp} data-parallel rank(s)): {exc}; change --batch-sizes, "
            "--micro-batch-size or --nproc"
        ) from None


def cell_skip(w: Workload, spec: SystemSpec, g: int) -> str:
    """Why this cell cannot run ('' when it can): its column's layout problem, or its batch split's."""
    if spec.skip:
        return spec.skip
    try:
        cell_batch(w, spec, g)
    except UsageError as exc:
        return str(exc)
    return ""


def stage_problem(w: Workload, spec: SystemSpec) -> str:
    """Why the model cannot be cut into the column's pipeline stages ('' when it can)."""
    if spec.kind != "overdrive" or spec.pp < 2 or spec.skip:
        return ""
    from overdrive.modeling import preset_config
    from overdrive.parallel.pipeline import check_pipeline

    strategy = load_strategy(spec.strategy)
    stages = spec.pp * getattr(strategy, "virtual_stages", 1)
    try:
        check_pipeline(preset_config(w.model_config), stages, getattr(strategy, "pipeline_split", "auto"))
    except UsageError as exc:
        return f"{spec.name} on {w.model_config}: {exc}"
    return ""


def plan_workload(w: Workload) -> Workload:
    """Every column planned and every cell's batch split checked, before anything runs. Columns or cells that
    cannot run are kept as skipped; a bench where nothing can run fails with the first reason."""
    systems = tuple(plan_system(s, w.nproc) for s in w.systems)
    systems = tuple(replace(s, skip=stage_problem(w, s)) if not s.skip else s for s in systems)
    planned = replace(w, systems=systems)
    reasons = [cell_skip(planned, spec, g) for spec in systems for g in planned.batch_sizes]
    if all(reasons):
        raise UsageError(reasons[0])
    return planned


def pipeline_bubble(row: dict[str, Any]) -> float | None:
    """The pipeline's idle share per step in its schedule's textbook model (equal stage times), from the row's
    pp, schedule, virtual stages and micro-batches per step (its accumulation); None for non-pipeline cells."""
    pp, n_micro = row.get("pp") or 1, row.get("accumulation_steps")
    if pp < 2 or not n_micro or not row.get("pipeline_schedule"):
        return None
    from overdrive.parallel.pipeline import bubble_fraction

    return bubble_fraction(row["pipeline_schedule"], pp, int(n_micro), row.get("virtual_stages") or 1)


def schedule_of(spec: SystemSpec) -> tuple[str | None, int]:
    """(pipeline schedule, virtual stages per rank) of a pipeline column; (None, 1) otherwise."""
    if spec.kind != "overdrive" or spec.pp < 2:
        return None, 1
    strategy = load_strategy(spec.strategy)
    return getattr(strategy, "pipeline_schedule", "1f1b"), int(getattr(strategy, "virtual_stages", 1))


def planned_row(spec: SystemSpec, w: Workload, g: int) -> dict[str, Any]:
    """A cell's row before it runs: its layout (seed 004's columns: tp, pp, micro batch, accumulation, global
    batch) and empty measurements; `run_cell` fills in the outcome."""
    skip = cell_skip(w, spec, g)
    micro, accum = (None, None) if skip else cell_batch(w, spec, g)
    schedule, virtual = schedule_of(spec)
    row = {
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
        "pipeline_schedule": schedule,
        "virtual_stages": virtual,
        "pipeline_bubble": None,
        "status": "skipped" if skip else "planned",
        "message": skip,
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
    row["pipeline_bubble"] = pipeline_bubble(row)
    return row


LAYOUT_KEYS = ("system", "strategy", "global_batch_size", "nproc", "tp", "pp", "dp", "micro_batch_size",
               "accumulation_steps", "pipeline_schedule", "pipeline_bubble", "status", "message")  # fmt: skip


def describe_cells(w: Workload) -> list[dict[str, Any]]:
    """Every cell's layout, for `--dry-run`: what would be launched (or why a cell is skipped), before anything
    is prepared."""
    return [described(planned_row(spec, w, g)) for spec in w.systems for g in w.batch_sizes]


def described(row: dict[str, Any]) -> dict[str, Any]:
    """A planned row's layout; the pipeline keys only for pipeline cells, the message only for skipped ones."""
    out = {k: v for k, v in row.items() if k in LAYOUT_KEYS}
    if row["pp"] < 2:
        out = {k: v for k, v in out.items() if not k.startswith("pipeline_")}
    if not row["message"]:
        del out["message"]
    return out
