"""`overdrive tune`: find the fastest strategy by measuring it, with as few trials as possible.

The search space is the plan's candidates (overdrive.search.plan) on the axes this command varies: precision,
kernels, compile, micro-batch, recompute and, on more than one rank, the data-parallel kind. What the plan says
cannot fit is pruned without running; the plan's best predictions are the first trials (optuna's
`enqueue_trial`); then optuna's TPE sampler proposes the rest. Each trial is a short real training run
(overdrive.search.trial). A trial that ends in OOM, a crash or a timeout is told to optuna as PRUNED, never as
a throughput of 0: TPE ranks it behind every measured trial without a made-up number. A proposal that repeats
a measured point costs nothing (FAIL, ignored by TPE) and the nearest unmeasured point is tried instead.
The last runs of the budget re-measure the fastest points back to back (one 3-step run is ±10% on a shared
machine, enough to swap two close points); points are ranked by the median of all their runs.
The winner is checked with `overdrive verify`, written as best.yaml and cached for `--strategy auto`.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from overdrive.errors import UsageError
from overdrive.search.trial import TrialResult, TrialSpec, run_trial

AXES = ("precision", "kernels", "compile", "micro", "recompute", "dp")
RECOMPUTE = ("none", "full", "selective")  # every_k is left to explicit strategies
OWN_ENTRIES = ("tune.md", "tune.json", "tune.png", "best.yaml", "trials", "verify", "verify.yaml")


@dataclass(frozen=True)
class Point:
    """One point of the search space (the optuna parameters of a trial)."""

    precision: str
    kernels: bool
    compile: bool
    micro: int
    recompute: str
    dp: str

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def distance(self, other: Point) -> int:
        return sum(getattr(self, a) != getattr(other, a) for a in AXES)

    def describe(self) -> str:
        parts = [self.precision, f"micro {self.micro}", f"AC {self.recompute}"]
        parts += [name for name in ("kernels", "compile") if getattr(self, name)]
        return (f"{self.dp}, " if self.dp != "single" else "") + ", ".join(parts)


@dataclass
class Trial:
    """A row of tune.md: the point, the plan's prediction, what was measured and how the point was chosen."""

    number: int
    point: Point
    source: str  # plan | tpe | neighbour | confirm
    candidate: Any  # overdrive.search.plan.Candidate
    result: TrialResult

    @property
    def tokens_per_sec(self) -> float | None:
        return self.result.tokens_per_sec if self.result.ok else None


def dp_label(kind: str) -> str:
    """The plan's layout label as an axis value: "fsdp zero-3" -> "fsdp-zero-3"."""
    return "single" if kind == "no data parallel" else kind.replace(" ", "-")


def point_of(candidate: Any) -> Point | None:
    """The Point of a plan candidate, or None for one outside what tune varies (tp, pp, offload, every_k)."""
    s = candidate.strategy
    if s.tensor_parallel != 1 or s.pipeline_parallel != 1 or s.offload != "none":
        return None
    if s.activation_checkpointing not in RECOMPUTE or candidate.kind.startswith("hsdp"):
        return None
    return Point(
        candidate.precision,
        bool(s.kernels),
        bool(s.compile),
        candidate.micro,
        s.activation_checkpointing,
        dp_label(candidate.kind),
    )


@dataclass
class Space:
    """Every point tune may run, with its plan candidate; `feasible` says whether the plan lets it run."""

    candidates: dict[Point, Any]
    feasible: dict[Point, bool]
    order: list[Point]  # plan order: fitting ones by predicted time, then the rest

    def choices(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for axis in AXES:
            values = {getattr(p, axis) for p in self.order}
            out[axis] = sorted(values, key=lambda v: (str(type(v)), v))
        return out

    def feasible_points(self) -> list[Point]:
        return [p for p in self.order if self.feasible[p]]


def build_space(
    ranked: list[Any], restrict: dict[str, set[Any]], world: int, host_memory: float | None
) -> Space:
    """The plan's candidates reduced to tune's axes and restricted by pins and --space.

    `host_memory` (CPU targets): all ranks share the host, so a point fits only when world × its per-rank
    peak does.
    """
    candidates: dict[Point, Any] = {}
    for c in ranked:
        point = point_of(c)
        if point is None or point in candidates or (point.dp == "single") != (world == 1):
            continue
        if any(getattr(point, axis) not in allowed for axis, allowed in restrict.items()):
            continue
        candidates[point] = c
    if not candidates:
        raise UsageError(
            "the pins and --space leave no strategy to tune; widen --space or drop a pinning flag"
        )
    feasible = {
        p: bool(c.fits and (host_memory is None or c.memory.reserved * world <= host_memory))
        for p, c in candidates.items()
    }
    if not any(feasible.values()):
        raise UsageError(
            "the plan predicts that no strategy in the search space fits in memory; lower --global-batch-size "
            "or --block-size, or add ranks with --nproc-per-node"
        )
    order = prior_order(candidates, feasible)
    return Space(candidates, feasible, order)


def prior_order(candidates: dict[Point, Any], feasible: dict[Point, bool]) -> list[Point]:
    """Fitting points first, by the plan's predicted time; predictions within 1% count as ties, and among
    ties the larger micro-batch goes first (the time model does not price per-kernel overhead, which small
    matmuls pay most). Seeds and neighbours are taken in this order."""
    fitting = [candidates[p].time.total for p in candidates if feasible[p]]
    best = min(fitting, default=1.0) or 1.0
    plan_index = {p: i for i, p in enumerate(candidates)}

    def key(p: Point) -> tuple:
        return (not feasible[p], round(candidates[p].time.total / best, 2), -p.micro, plan_index[p])

    return sorted(candidates, key=key)


def plan_seeds(space: Space, count: int) -> list[Point]:
    """The plan's best predictions, spread out: each seed differs from the earlier ones in 2+ axes."""
    seeds: list[Point] = []
    for point in space.feasible_points():
        if all(point.distance(s) >= 2 for s in seeds):
            seeds.append(point)
        if len(seeds) == count:
            break
    return seeds


def nearest_unmeasured(space: Space, around: Point, measured: set[Point]) -> Point | None:
    """The feasible unmeasured point closest to `around` (ties: the plan's order)."""
    left = [p for p in space.feasible_points() if p not in measured]
    if not left:
        return None
    return min(left, key=lambda p: (p.distance(around), space.order.index(p)))


def spec_for(candidate: Any, world: int) -> TrialSpec:
    strategy = dataclasses.replace(candidate.strategy, micro_batch_size=candidate.micro)
    return TrialSpec(strategy, candidate.precision, world)


def seed_count(trials: int) -> int:
    return max(1, min(4, trials // 4))


def confirm_count(trials: int, requested: int) -> int:
    """Re-measurement runs taken from the trial budget: at most a quarter of it, so the search keeps most."""
    return max(0, min(requested, trials // 4))


def search(
    space: Space,
    base: Any,
    out: Path,
    trials: int,
    seed: int,
    world: int,
    time_budget: float | None,
    trial_steps: int,
    trial_timeout: float,
    report: Any = print,
    confirm: int = 0,
) -> list[Trial]:
    """Run up to `trials` measured runs: optuna-guided trials, then `confirm` re-measurements of the fastest
    points (`confirm_count`); every run is returned in order."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seeds = plan_seeds(space, seed_count(trials))
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=len(seeds))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for point in seeds:
        study.enqueue_trial(point.params(), user_attrs={"source": "plan"})
    choices = space.choices()
    done: dict[Point, Trial] = {}
    history: list[Trial] = []
    start = time.perf_counter()
    asks, max_asks = 0, 50 * trials + len(space.order)
    feasible_count = len(space.feasible_points())
    explore = trials - confirm
    while len(history) < explore and len(done) < feasible_count and asks < max_asks:
        remaining = None if time_budget is None else time_budget - (time.perf_counter() - start)
        if remaining is not None and remaining <= 0:
            report(f"time budget of {time_budget:g} s spent after {len(history)} trials")
            break
        asks += 1
        trial = study.ask()
        point = Point(**{axis: trial.suggest_categorical(axis, choices[axis]) for axis in AXES})
        source = trial.user_attrs.get("source", "tpe")
        if point not in space.candidates or not space.feasible[point]:
            trial.set_user_attr("status", "pruned by the plan")
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        if point in done:  # a repeat: no new information, try the closest point not measured yet
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            nxt = nearest_unmeasured(space, point, set(done))
            if nxt is not None:
                study.enqueue_trial(nxt.params(), user_attrs={"source": "neighbour"})
            continue
        timeout = trial_timeout if remaining is None else max(1.0, min(trial_timeout, remaining))
        candidate = space.candidates[point]
        number = len(history)
        result = run_trial(
            base, spec_for(candidate, world), out / "trials" / f"{number:03d}", trial_steps, timeout
        )
        record = Trial(number, point, source, candidate, result)
        done[point] = record
        history.append(record)
        trial.set_user_attr("status", result.status)
        if result.ok:
            study.tell(trial, result.tokens_per_sec)
        else:  # infeasible: ranked behind every measured trial, never scored as 0 tokens/s
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        report(trial_line(record, trials, base.block_size, base.global_batch_size, world))
        base = reuse_tokenizer(base, result)
    deadline = None if time_budget is None else start + time_budget
    history += remeasure(
        history, base, out, trials, world, confirm, deadline, trial_steps, trial_timeout, report
    )
    return history


def remeasure(
    history: list[Trial],
    base: Any,
    out: Path,
    trials: int,
    world: int,
    count: int,
    deadline: float | None,
    trial_steps: int,
    trial_timeout: float,
    report: Any,
) -> list[Trial]:
    """Spend `count` runs re-measuring the leading points in turn (leader, runner-up, leader, ...), so the
    choice between close points rests on runs made under the same machine conditions, and the leader's rate
    is a median of three runs: one slow or one lucky run cannot decide it alone."""
    ranked = best_trials(history)
    if len(ranked) < 2:  # nothing to choose between
        return []
    leaders = ranked[: max(1, (count + 1) // 2)]
    top = [leaders[i % len(leaders)] for i in range(count)]
    reruns: list[Trial] = []
    for first in top:
        if deadline is not None and time.perf_counter() >= deadline:
            report("time budget spent; re-measurement cut short")
            break
        number = len(history) + len(reruns)
        timeout = (
            trial_timeout
            if deadline is None
            else max(1.0, min(trial_timeout, deadline - time.perf_counter()))
        )
        result = run_trial(
            base, spec_for(first.candidate, world), out / "trials" / f"{number:03d}", trial_steps, timeout
        )
        record = Trial(number, first.point, "confirm", first.candidate, result)
        reruns.append(record)
        report(trial_line(record, trials, base.block_size, base.global_batch_size, world))
    return reruns


def reuse_tokenizer(base: Any, result: TrialResult) -> Any:
    """From scratch, train trains a BPE tokenizer each run; the first trial's is reused by the rest."""
    if base.model or base.tokenizer or not result.run_dir:
        return base
    saved = Path(result.run_dir) / "run" / "tokenizer"
    return dataclasses.replace(base, tokenizer=str(saved)) if saved.is_dir() else base


def predicted_tokens_per_sec(candidate: Any, seq: int, global_batch: int, world: int) -> float:
    return candidate.tokens_per_second_per_device(seq, global_batch, world) * world


def trial_line(t: Trial, trials: int, seq: int, global_batch: int, world: int) -> str:
    r = t.result
    pred = predicted_tokens_per_sec(t.candidate, seq, global_batch, world)
    got = f"{r.tokens_per_sec:,.0f} tok/s" if r.ok else f"{r.status.upper()} ({r.error})"
    return (
        f"trial {t.number + 1}/{trials} [{t.source}] {t.point.describe()}: {got} (predicted {pred:,.0f}), "
        f"{r.seconds:.0f} s"
    )


def point_rate(history: list[Trial], point: Point) -> float | None:
    """The point's throughput: the median over all its finished runs (None when none finished)."""
    rates = [t.tokens_per_sec for t in history if t.point == point and t.tokens_per_sec is not None]
    return statistics.median(rates) if rates else None


def best_trials(history: list[Trial]) -> list[Trial]:
    """One trial per measured point (its first finished run), fastest point first by `point_rate`."""
    first: dict[Point, Trial] = {}
    for t in history:
        if t.result.ok:
            first.setdefault(t.point, t)
    return sorted(first.values(), key=lambda t: -(point_rate(history, t.point) or 0.0))
