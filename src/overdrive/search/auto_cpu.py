"""`--strategy auto` on one CPU process: measure precision × kernels, then compile when the run repays it.

Why measure: the plan cannot tell these candidates apart on a CPU (same FLOPs); bf16 autocast is faster than
fp32 on CPUs with native bf16 matmuls and slower on those without, and what fused kernels and compilation save
depends on the memory system. `auto_measure` times them on the real model.

Compile: its first step (compiling the decoder blocks, tens of seconds on a CPU) is not part of its step time,
but it is paid once per run, so compile is chosen only when it repays: it is tried only when the eager run is
predicted to last REPAY_FACTOR times a guess of the compile cost, and then chosen only when its measured
first-step excess, spread over the run's forward+backward passes, still leaves it faster than eager. The run's
length comes from --max-steps, else from epochs over the training rows, estimated from the data's size
(CHARS_PER_TOKEN); over a hub dataset of unknown size the run is taken as long (steady state decides).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from overdrive.parallel.strategy import Strategy, default_micro
from overdrive.search.auto import Choice, Context, Pins, fallback
from overdrive.search.auto_measure import Measurement, Measurer, Probe

COMPILE_COST_GUESS_S = 20.0  # what compiling the decoder blocks costs on a CPU before it is measured
REPAY_FACTOR = 3.0  # compile is tried only when the eager run is this many times its (guessed) cost
CHARS_PER_TOKEN = 4.0  # a rough BPE ratio of English text, only to guess how long an epoch-based run is


def measured_choice(
    cfg: Any, ctx: Context, pins: Pins, options: list[Any], measurer: Measurer | None
) -> Choice:
    """Measure the eager precision × kernels candidates, then compile on the winner when it can repay."""
    from overdrive.search.auto_measure import measure

    measurer = measurer or measure
    recompute = options[0].strategy.activation_checkpointing
    eager = eager_probes(options, pins, recompute)
    results = dict(measurer(ctx.model_config, cfg, eager))
    good = {p: m for p, m in results.items() if m.step_s and m.tokens_per_sec}  # not the screened-out ones
    if not good:
        errors = "; ".join(sorted({m.error for m in results.values() if m.error}))[:200]
        return fallback(cfg, ctx, pins, f"measurement failed ({errors or 'no result'})")
    winner = max(good, key=lambda p: good[p].tokens_per_sec or 0.0)
    winner, note = maybe_compile(cfg, ctx, pins, options, winner, good, results, measurer)
    strategy = Strategy(kernels=winner.kernels, compile=winner.compile, activation_checkpointing=recompute)
    if recompute == "every_k":
        strategy.ac_every = options[0].strategy.ac_every
    measured = {p.label: round(m.tokens_per_sec, 1) for p, m in results.items() if m.tokens_per_sec}
    return Choice(
        strategy, winner.precision, "measured", measured_reason(winner, results, note), measured=measured
    )


def eager_probes(options: list[Any], pins: Pins, recompute: str) -> list[Probe]:
    """Every (precision, kernels) the plan's options and the flags leave open, in plan order; a pinned fp16
    or a plan without one precision still measures what the flags ask for."""
    precisions = [pins.precision] if pins.precision else list(dict.fromkeys(c.precision for c in options))
    kernels = list(dict.fromkeys(c.strategy.kernels for c in options))
    return [Probe(p, k, False, recompute) for p in precisions for k in kernels]


def maybe_compile(
    cfg: Any,
    ctx: Context,
    pins: Pins,
    options: list[Any],
    winner: Probe,
    good: dict[Probe, Measurement],
    results: dict[Probe, Measurement],
    measurer: Measurer,
) -> tuple[Probe, str]:
    """The eager winner, compiled when compile is pinned, or when it is free, admitted by the plan, and the
    run is long enough: then its measured first step spread over the run's micro-steps must still win."""
    compiled = dataclasses.replace(winner, compile=True)
    if pins.compile is not None:
        return (compiled if pins.compile else winner), ""
    if not any(c.strategy.compile for c in options):
        return winner, ""
    step = good[winner].step_s or 0.0
    micro_steps = planned_micro_steps(cfg)
    run_s = micro_steps * step if micro_steps else math.inf
    if run_s < REPAY_FACTOR * max(COMPILE_COST_GUESS_S, 10 * step):
        return winner, f"compile not tried: a run of ~{run_s:,.0f} s cannot repay compiling"
    results.update(measurer(ctx.model_config, cfg, [compiled]))
    m = results.get(compiled)
    if m is None or not m.step_s:
        return winner, "compile failed"
    cost = max(0.0, (m.first_step_s or 0.0) - m.step_s)
    amortised = m.step_s + (cost / micro_steps if micro_steps else 0.0)
    over = "over the run" if micro_steps else "over a run of unknown length (steady state decides)"
    if amortised < step:
        return compiled, f"compile ~{cost:,.0f} s, repaid {over}"
    return winner, f"compile ~{cost:,.0f} s, not repaid {over}"


def planned_micro_steps(cfg: Any) -> int | None:
    """Forward+backward passes of this process over the run: --max-steps, else epochs over the training rows
    (--max-train-samples, or estimated from the data's size); None when the size cannot be known (hub data)."""
    steps = cfg.max_steps
    if steps is None:
        rows = estimated_rows(cfg)
        if rows is None:
            return None
        steps = math.ceil(cfg.num_train_epochs * max(1, rows // cfg.global_batch_size))
    micro = cfg.micro_batch_size or default_micro(cfg.global_batch_size)
    return steps * max(1, cfg.global_batch_size // micro)


def estimated_rows(cfg: Any) -> int | None:
    """Training rows of --block-size tokens, roughly: characters ÷ CHARS_PER_TOKEN ÷ block, less the
    validation split; capped by --max-train-samples."""
    if cfg.dataset:
        chars = None
    elif cfg.train_file:
        path = Path(cfg.train_file)
        chars = path.stat().st_size if path.is_file() else None
    else:
        from overdrive.data.sources import embedded_texts

        chars = sum(len(t) for t in embedded_texts())
    if chars is None:
        return cfg.max_train_samples
    held_out = 0 if cfg.validation_file else cfg.validation_split_percentage / 100
    rows = int(chars / CHARS_PER_TOKEN / cfg.block_size * (1 - held_out))
    return min(rows, cfg.max_train_samples) if cfg.max_train_samples else rows


def measured_reason(winner: Probe, results: dict[Probe, Measurement], note: str) -> str:
    """`measured 5,443 vs 3,914 tok/s plain; bf16 slower here (3,362); <compile note>`."""
    rate = {p: m.tokens_per_sec for p, m in results.items() if m.tokens_per_sec}
    if winner not in rate:  # --compile pinned: compiled, but measured eager
        winner = dataclasses.replace(winner, compile=False)
    plain = Probe("fp32", False, False, winner.recompute)
    rivals = [p for p in rate if p != winner]
    rival = plain if plain in rivals else max(rivals, key=lambda p: rate[p] or 0.0, default=None)
    parts = [f"measured {rate[winner]:,.0f} tok/s"]
    if rival is not None:
        name = "plain" if rival == plain else rival.label
        parts = [f"measured {rate[winner]:,.0f} vs {rate[rival]:,.0f} tok/s {name}"]
    other = "fp32" if winner.precision == "bf16" else "bf16"
    others = [p for p in rate if p.precision == other and not p.compile]
    if others:
        top = max(others, key=lambda p: rate[p] or 0.0)
        word = "slower" if (rate[top] or 0) < (rate[winner] or 0) else "faster"
        how = f"{rate[top]:,.0f}" + (", one-row screen" if not results[top].step_s else "")
        parts.append(f"{other} {word} here ({how})")
    if note:
        parts.append(note)
    return "; ".join(parts)


# ----------------------------------------------------------------------------------- pinned strategy
def choose_precision(cfg: Any, ctx: Context, strategy: Strategy, measurer: Measurer | None) -> Choice:
    """--strategy NAME with --precision auto: bf16 on a GPU that has it; on one CPU process fp32 and bf16 are
    measured on the strategy's kernels (eager); several CPU ranks keep fp32 (no measurement across ranks)."""
    import torch

    if ctx.cuda:
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return Choice(
            strategy, precision, "plan", f"{ctx.device_name} {'has' if precision == 'bf16' else 'lacks'} bf16"
        )
    if ctx.world > 1 or ctx.model_config is None:
        return Choice(
            strategy, "fp32", "fallback", "fp32 on CPU ranks (bf16 is measured only on one process)"
        )
    from overdrive.search.auto_measure import measure

    recompute = strategy.activation_checkpointing
    probes = [Probe(p, strategy.kernels, False, recompute) for p in ("fp32", "bf16")]
    results = dict((measurer or measure)(ctx.model_config, cfg, probes))
    rate = {p.precision: m.tokens_per_sec for p, m in results.items() if m.tokens_per_sec}
    if not rate:
        return Choice(strategy, "fp32", "fallback", "measurement failed; fp32")
    precision = max(rate, key=lambda p: rate[p] or 0.0)
    why = ", ".join(f"{p} {r:,.0f}" for p, r in rate.items())
    measured = {p.label: round(m.tokens_per_sec, 1) for p, m in results.items() if m.tokens_per_sec}
    return Choice(strategy, precision, "measured", f"measured tok/s: {why}", measured=measured)
