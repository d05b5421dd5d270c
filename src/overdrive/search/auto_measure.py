"""The quick in-process measurement behind `--strategy auto` on one CPU process.

Why measure at all: on a CPU the plan's time model cannot tell the candidates apart (they do the same FLOPs),
and the decisive differences are properties of the machine: bf16 autocast is faster than fp32 on CPUs with
native bf16 matmuls (AVX512-BF16, AMX) and *slower* on those without, and what fused kernels and compilation
save depends on the memory system. So the real model (the run's architecture, random weights) runs a few
forward+backward passes per candidate at the run's micro batch and block size, on random tokens.

How: one model is built per (kernels, compile) pair and each precision runs on it under its own autocast, so
at most two eager models (plain, kernels) and one compiled model exist at a time. Candidates are interleaved
(round-robin over the timed steps), so background load slows all of them alike, and each candidate's median
step is taken. The first step of each candidate is not timed (allocator warm-up; for a compiled model it is
the compilation, reported separately as `first_step_s`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from overdrive.parallel.strategy import default_micro

TIMED_STEPS = 3  # timed forward+backward passes per candidate (after one untimed warm-up)
SCREEN_FACTOR = 4.0  # a probe this much slower than the best on one row is not measured at full size
BUDGET_S = 30.0  # timed rounds beyond the first stop here (a model too large for a quick measurement)


@dataclass(frozen=True)
class Probe:
    """What is measured: a precision on a model with or without kernels and compile (recompute as given)."""

    precision: str
    kernels: bool
    compile: bool = False
    recompute: str = "none"

    @property
    def label(self) -> str:
        parts = [p for p, on in (("kernels", self.kernels), ("compile", self.compile)) if on]
        return f"{self.precision} {'+'.join(parts) or 'plain'}"


@dataclass
class Measurement:
    """Median seconds of one forward+backward, the untimed first step, and tokens/s; or why it failed."""

    step_s: float | None = None
    first_step_s: float | None = None
    tokens_per_sec: float | None = None
    error: str = ""


# (model config, run config, probes) -> one Measurement per probe; tests inject fakes of this shape
Measurer = Callable[[Any, Any, Sequence[Probe]], dict[Probe, Measurement]]


def measure(model_config: Any, cfg: Any, probes: Sequence[Probe]) -> dict[Probe, Measurement]:
    """Time every probe side by side on the real model (see the module docstring); never raises for a probe."""
    micro = cfg.micro_batch_size or default_micro(cfg.global_batch_size)  # one process measures
    tokens = micro * cfg.block_size
    groups: dict[tuple[bool, bool, str], list[Probe]] = {}
    for probe in probes:
        groups.setdefault((probe.kernels, probe.compile, probe.recompute), []).append(probe)
    results: dict[Probe, Measurement] = {}
    runners: list[tuple[Probe, Callable[[], float], Callable[[], float]]] = []
    batch = random_batch(model_config.vocab_size, micro, cfg.block_size, cfg.seed)
    for (kernels, compiled, recompute), members in groups.items():
        try:
            module, context = build_module(model_config, cfg, kernels, compiled, recompute)
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot be built is just not chosen
            for probe in members:
                results[probe] = Measurement(error=_one_line(exc))
            continue
        for probe in members:
            one_row = step_runner(
                module, context, {k: v[:1] for k, v in batch.items()}, probe.precision, tokens
            )
            runners.append((probe, step_runner(module, context, batch, probe.precision, tokens), one_row))
    results.update(screen(runners, cfg.block_size))
    runners = [r for r in runners if r[0] not in results]
    first, timed, failed = run_rounds([(probe, run) for probe, run, _ in runners])
    for probe, _, _ in runners:
        if probe in failed:
            results[probe] = Measurement(error=failed[probe])
        else:  # no timed round when the warm-up alone took the whole budget: its steps are the estimate
            step = statistics.median(timed[probe] or [first[probe]])
            results[probe] = Measurement(step, first[probe], tokens / step)
    return results


def screen(
    runners: list[tuple[Probe, Callable[[], float], Callable[[], float]]], seq: int
) -> dict[Probe, Measurement]:
    """Probes hopelessly slower than the best (SCREEN_FACTOR on a one-row batch, second call timed) are left
    out of the full-size rounds, with that one-row rate as their (rough) number: on a CPU without native bf16
    one full bf16 step can take longer than every fp32 measurement together."""
    seconds: dict[Probe, float] = {}
    for probe, _, one_row in runners:
        try:
            one_row()
            seconds[probe] = one_row()
        except Exception:  # noqa: BLE001 - the full-size rounds report the failure
            continue
    if not seconds:
        return {}
    best = min(seconds.values())
    return {
        p: Measurement(None, None, seq / t, f"screened out: {t / best:.0f}x slower on one row")
        for p, t in seconds.items()
        if t > SCREEN_FACTOR * best
    }


def run_rounds(
    runners: list[tuple[Probe, Callable[[], float]]],
) -> tuple[dict[Probe, float], dict[Probe, list[float]], dict[Probe, str]]:
    """Round 0 is each probe's untimed first step; then TIMED_STEPS rounds, fewer when they would take longer
    than BUDGET_S (a large model, an overloaded CPU), none when round 0 alone took that long."""
    first: dict[Probe, float] = {}
    timed: dict[Probe, list[float]] = {p: [] for p, _ in runners}
    failed: dict[Probe, str] = {}
    rounds = TIMED_STEPS
    for round_ in range(TIMED_STEPS + 1):
        if round_ > rounds:
            break
        started = time.perf_counter()
        for probe, run in runners:
            if probe in failed:
                continue
            try:
                seconds = run()
            except Exception as exc:  # noqa: BLE001 - a failing candidate is just not chosen
                failed[probe] = _one_line(exc)
                continue
            if round_:
                timed[probe].append(seconds)
            else:
                first[probe] = seconds
        spent = time.perf_counter() - started
        if round_ == 0 and spent > BUDGET_S:
            break  # an overloaded machine or a large model: the warm-up steps must do
        if round_ == 1:
            rounds = max(1, min(TIMED_STEPS, int(BUDGET_S // max(spent, 1e-9))))
    return first, timed, failed


def random_batch(vocab: int, micro: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (micro, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def build_module(
    model_config: Any, cfg: Any, kernels: bool, compiled: bool, recompute: str
) -> tuple[Any, Any]:
    """The run's model, randomly initialised on the CPU, through overdrive's own transforms (kernels, adapters,
    recompute, compile) for a single process."""
    import copy

    from overdrive.core.runtime import Runtime
    from overdrive.parallel import Strategy, parallelize
    from overdrive.parallel.adapters import adapter_spec
    from overdrive.parallel.materialize import build_meta_model, materialize, meta_reference

    runtime = Runtime()
    model = build_meta_model(copy.deepcopy(model_config), cfg.attn_implementation, cfg.dtype)
    reference = meta_reference(model)
    strategy = Strategy(kernels=kernels, compile=compiled, activation_checkpointing=recompute)
    result = parallelize(
        model,
        strategy,
        runtime,
        lambda m: materialize(m, reference, seed=cfg.seed, device=runtime.device),
        adapter_spec(cfg),
    )
    result.module.train()
    return result.module, result.loss_context


def step_runner(
    module: Any, context: Any, batch: dict[str, torch.Tensor], precision: str, tokens: int
) -> Callable[[], float]:
    """One forward+backward under the precision's autocast, as the training loop runs it; returns seconds."""
    import contextlib

    from overdrive.core.engine import autocast

    device = torch.device("cpu")

    def run() -> float:
        start = time.perf_counter()
        with context() if context else contextlib.nullcontext(), autocast(precision, device):
            loss = module(**batch, num_items_in_batch=tokens).loss
        loss.backward()
        seconds = time.perf_counter() - start
        for p in module.parameters():
            p.grad = None
        return seconds

    return run


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:200]
