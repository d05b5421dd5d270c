"""`overdrive train`, top to bottom: data -> model -> parallelize -> loop (log, eval, save) -> export -> sample.

The loss of a step is the token-mean cross-entropy over the whole global batch: every micro-batch's summed loss
is divided by the number of target tokens in the global batch (all data-parallel ranks, all micro-batches), so
accumulation and parallelism change nothing numerically (no gradient-accumulation loss bug).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from overdrive.atomic import write_json, write_text
from overdrive.config import TrainConfig
from overdrive.core.engine import TrainEngine
from overdrive.core.runtime import Runtime
from overdrive.data.loader import count_target_tokens
from overdrive.errors import TrainingDiverged
from overdrive.metrics import (
    MetricsWriter,
    flops_per_token,
    peak_memory_bytes,
    peak_tflops,
    plot_curves,
    read_metrics,
)
from overdrive.modeling import count_parameters
from overdrive.parallel import Strategy
from overdrive.parallel.adapters import parameter_counts
from overdrive.parallel.distributed import guard, init_runtime, launch_env, leave_together, shutdown
from overdrive.search.auto import Choice, choose, save_choice
from overdrive.tracking import open_trackers, parse_report_to
from overdrive.train import checkpoint
from overdrive.train.build import (
    build_engine,
    build_model,
    check_model_source,
    resolve_strategy,
    seed_everything,
)
from overdrive.train.data_stage import RawData, TrainData, prepare_data, read_data
from overdrive.train.faults import maybe_fail
from overdrive.train.finish import (
    build_summary,
    evaluate,
    export_final,
    generate_sample,
    summary_line,
    truncate_metrics,
)
from overdrive.train.optim import optimizer_state_bytes
from overdrive.train.progress import Progress
from overdrive.train.rundir import claim_output_dir, clear_run, plan_output


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run `cfg` on this process (one of `torchrun`'s ranks, or alone) and return the summary (rank 0)."""
    output_dir, resume_from = plan_output(cfg)
    world = launch_env().world_size
    check_model_source(cfg)  # a bad model or an unreachable hub fails before auto measures anything
    raw_data = read_data(cfg)  # and so does bad data
    choice = choose(cfg, world, output_dir, resume_from)  # --strategy/--precision auto, before anything heavy
    cfg = dataclasses.replace(cfg, precision=choice.precision)
    strategy = resolve_strategy(cfg, choice.strategy)
    strategy.validate(world)  # bad combinations and degrees fail before any process group starts
    strategy = strategy.resolved_for(world)
    check_model_source(cfg, strategy)
    runtime = init_runtime(strategy)
    try:
        with guard(runtime):
            with contextlib.ExitStack() as cleanup:
                summary = run(cfg, strategy, runtime, output_dir, resume_from, cleanup, choice, raw_data)
            leave_together(runtime)
            return summary
    finally:
        shutdown()


def run(
    cfg: TrainConfig,
    strategy: Strategy,
    runtime: Runtime,
    output_dir: Path,
    resume_from: Path | None,
    cleanup: contextlib.ExitStack,
    choice: Choice,
    raw_data: RawData,
) -> dict[str, Any]:
    seed_everything(cfg.seed, cfg.deterministic)
    data = prepare_data(cfg, strategy, runtime, output_dir if resume_from else None, raw_data)
    model, fill = build_model(cfg, len(data.tokenizer), runtime)  # on meta: no weights yet
    n_params, n_compute_params = count_parameters(model)
    flops_tok = flops_per_token(
        n_compute_params, model.config.num_hidden_layers, model.config.hidden_size, cfg.block_size
    )
    engine = build_engine(model, cfg, strategy, runtime, data, fill)  # parallelized, local shards filled

    # from here on the run writes to disk, holding the output dir until it ends
    cleanup.enter_context(claim_output_dir(cfg, runtime, output_dir, resume_from))
    start_step = start_or_resume(engine, cfg, data, output_dir, resume_from)
    if runtime.is_main:
        save_choice(output_dir, choice)  # a resume reuses it
    writer = open_metrics(cfg, runtime, output_dir, resume_from, start_step, cleanup)
    log = Progress(data.total_steps, start_step, enabled=runtime.is_main, quiet=cfg.quiet)
    if choice.auto:
        log.info(choice.line())  # what --strategy/--precision auto chose, and why
    log.info(
        f"model {n_params / 1e6:.1f}M params, {len(data.train_rows)} train rows of {cfg.block_size} tokens from "
        f"{data.source}, {data.total_steps} steps of {cfg.global_batch_size} rows (micro "
        f"{data.plan.micro_batch_size} × {data.plan.accumulation_steps} accumulation × {runtime.dp_size} "
        f"data-parallel ranks; {runtime.dims.describe()}) -> {output_dir}"
    )

    def evaluate_at(step: int) -> dict[str, float] | None:
        if data.validation is None:
            return None
        result = evaluate(engine, data.validation, cfg, runtime, data.plan.micro_batch_size)
        if writer:
            writer.write({"step": step, **result})
        return result

    # at the start, not again when resuming a finished run (its final eval follows)
    if start_step < data.total_steps:
        evaluate_at(start_step)
    meter = Throughput(warmup=2 if strategy.compile else 1, start_step=start_step)
    tokens_per_step = cfg.global_batch_size * cfg.block_size
    started = time.perf_counter()
    engine.model.train()
    for step in range(start_step, data.total_steps):
        t0 = time.perf_counter()
        loss, grad_norm, lr = train_step(engine, data.micro_batches(step, cfg.seed, runtime.dp_rank), cfg)
        check_finite(loss, step + 1, output_dir)
        meter.add(step, tokens_per_step, time.perf_counter() - t0)
        log.advance(loss)
        done = step + 1
        if done == start_step + 1:  # the state exists once the optimizer has stepped
            state_mib = optimizer_state_bytes(engine.optimizer) / 2**20
            log.info(f"optimizer {cfg.optimizer}: {state_mib:.2f} MiB of state on this rank")
        if done == start_step + 1 or done % cfg.logging_steps == 0 or done == data.total_steps:
            record = step_record(done, loss, grad_norm, lr, meter, data, runtime, flops_tok, started)
            if writer:
                writer.write(record)
            log.metrics(record)
        if cfg.eval_steps and done % cfg.eval_steps == 0 and done != data.total_steps:
            result = evaluate_at(done)
            if result:
                log.info(
                    f"eval at step {done}: loss {result['eval_loss']:.4f}, ppl {result['eval_perplexity']:.2f}"
                )
            engine.model.train()
        if cfg.save_steps and done % cfg.save_steps == 0 and done != data.total_steps:
            save(engine, cfg, output_dir, done)
        maybe_fail(done, runtime)
    log.close()
    wall = time.perf_counter() - started

    evaluate_at(data.total_steps)
    if cfg.save_steps and start_step < data.total_steps:
        save(engine, cfg, output_dir, data.total_steps)
    if writer:
        writer.close()
    return finish(engine, cfg, data, runtime, output_dir, log, meter, wall, n_params, flops_tok, choice)


def start_or_resume(
    engine: TrainEngine, cfg: TrainConfig, data: TrainData, output_dir: Path, resume_from: Path | None
) -> int:
    """The first step to run: the checkpoint's (its metrics kept up to it), or 0 in a cleared run dir."""
    main = engine.runtime.is_main
    start_step = 0
    if resume_from is not None:
        start_step = checkpoint.load(engine, resume_from)["step"]
        if main:
            truncate_metrics(output_dir / "metrics.jsonl", start_step)
    elif main:
        clear_run(output_dir)
        data.tokenizer.save_pretrained(str(output_dir / "tokenizer"))
    if main:
        write_text(output_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return start_step


def open_metrics(
    cfg: TrainConfig,
    runtime: Runtime,
    output_dir: Path,
    resume_from: Path | None,
    start_step: int,
    cleanup: contextlib.ExitStack,
) -> MetricsWriter | None:
    """metrics.jsonl (rank 0), mirrored to the --report-to trackers."""
    if not runtime.is_main:
        return None
    tracker = cleanup.enter_context(
        open_trackers(
            parse_report_to(cfg.report_to),
            output_dir,
            cfg.to_dict(),
            output_dir.name,
            resume_step=start_step if resume_from is not None else None,
        )
    )
    return MetricsWriter(output_dir / "metrics.jsonl", append=resume_from is not None, tracker=tracker)


def train_step(
    engine: TrainEngine, micro_batches: list[dict[str, torch.Tensor]], cfg: TrainConfig
) -> tuple[float, float, float]:
    """One optimizer step over this rank's micro-batches -> (global-batch loss, pre-clip grad norm, lr used).

    Each micro-batch loss is its token-summed CE divided by the target tokens of the whole global batch
    (`num_items_in_batch`), so the micro-batch losses of all data-parallel ranks add up to the global mean.
    """
    runtime = engine.runtime
    local_targets = sum(count_target_tokens(b) for b in micro_batches)
    n_targets = int(runtime.all_reduce_sum(torch.tensor(local_targets, dtype=torch.long), "dp").item())
    step_loss = engine.forward_backward(micro_batches, n_targets)
    lr = engine.current_lr()  # the rate this step used; step() advances the schedule
    grad_norm = engine.step(cfg.max_grad_norm)
    return float(runtime.all_reduce_sum(step_loss, "dp")), grad_norm, lr


def check_finite(loss: float, step: int, output_dir: Path) -> None:
    """A non-finite loss ends the run (exit 3); the checkpoints written so far stay."""
    if math.isfinite(loss):
        return
    kept = checkpoint.list_checkpoints(output_dir)
    raise TrainingDiverged(
        f"loss became {loss} at step {step}; stopped with "
        + (f"the last good checkpoint {kept[-1]} kept" if kept else "no checkpoint written")
        + "; lower --learning-rate or add --warmup-steps and start again"
    )


@dataclass
class Throughput:
    """Tokens per second over the timed steps (the first `warmup` pay for compilation and allocator warm-up)."""

    warmup: int
    start_step: int
    timed_tokens: int = 0
    timed_seconds: float = 0.0
    window_tokens: int = 0
    window_seconds: float = 0.0

    def add(self, step: int, tokens: int, seconds: float) -> None:
        if step - self.start_step >= self.warmup:
            self.timed_tokens += tokens
            self.timed_seconds += seconds
            self.window_tokens += tokens
            self.window_seconds += seconds

    def take_window(self) -> float | None:
        """Tokens/s since the last logged step, then start a new window."""
        rate = self.window_tokens / self.window_seconds if self.window_seconds > 0 else None
        self.window_tokens, self.window_seconds = 0, 0.0
        return rate


def step_record(
    done: int,
    loss: float,
    grad_norm: float,
    lr: float,
    meter: Throughput,
    data: TrainData,
    runtime: Runtime,
    flops_tok: float,
    started: float,
) -> dict[str, Any]:
    """One metrics.jsonl line."""
    tps = meter.take_window()
    per_device = tps / runtime.world_size if tps else None
    tflops = per_device * flops_tok / 1e12 if per_device else None
    peak = peak_tflops(runtime.device)
    return {
        "step": done,
        "epoch": round(done / data.steps_per_epoch, 3),
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_sec": tps,
        "tokens_per_sec_per_device": per_device,
        "tflops_per_device": tflops,
        "mfu": tflops / peak if (tflops and peak) else None,
        "peak_memory_bytes": peak_memory_bytes(runtime.device),
        "elapsed_sec": time.perf_counter() - started,
    }


def save(engine: TrainEngine, cfg: TrainConfig, output_dir: Path, step: int) -> None:
    state = {"consumed_samples": step * cfg.global_batch_size}
    checkpoint.save(engine, output_dir, step, state, cfg.save_total_limit)


def finish(
    engine: TrainEngine,
    cfg: TrainConfig,
    data: TrainData,
    runtime: Runtime,
    output_dir: Path,
    log: Progress,
    meter: Throughput,
    wall: float,
    n_params: int,
    flops_tok: float,
    choice: Choice,
) -> dict[str, Any]:
    """Export, the closing sample, curves and summary.json (rank 0 returns the summary)."""
    final_dir = output_dir / "final"
    if cfg.export:
        export_final(engine, data.tokenizer, final_dir)
    sample = generate_sample(engine, data.tokenizer, final_dir if cfg.export else None, cfg)
    if not runtime.is_main:
        return {}
    records = read_metrics(output_dir / "metrics.jsonl")
    with contextlib.suppress(Exception):  # a plot must never cost the run
        plot_curves(records, output_dir / "curves.png")
    write_text(output_dir / "sample.txt", cfg.prompt + sample + "\n")
    log.info("sample: " + " ".join(f"{cfg.prompt}{sample}".split()))
    summary = build_summary(
        cfg,
        records,
        data.total_steps,
        meter.timed_tokens,
        meter.timed_seconds,
        wall,
        runtime,
        n_params,
        flops_tok,
        data.source,
        output_dir,
        data.plan,
    )
    summary["optimizer_state_bytes"] = optimizer_state_bytes(engine.optimizer)  # this rank's shards
    summary["trainable_parameters"] = parameter_counts(engine.unwrapped_model())[0]  # LoRA: adapters only
    summary["strategy_choice"] = choice.to_dict()
    write_json(output_dir / "summary.json", summary)
    log.info(summary_line(summary))
    return summary
