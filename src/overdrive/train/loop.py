"""`overdrive train`, top to bottom: data -> tokenizer -> model -> engine -> loop -> eval -> export -> sample.

The loss of a step is the token-mean cross-entropy over the whole global batch: every micro-batch's summed loss
is divided by the number of target tokens in the global batch (all ranks, all micro-batches), so accumulation
and data parallelism change nothing numerically (no gradient-accumulation loss bug).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from datasets import Dataset

from overdrive.atomic import write_json, write_text
from overdrive.config import TrainConfig
from overdrive.core.engine import TrainEngine
from overdrive.core.runtime import Runtime
from overdrive.data.loader import (
    BatchPlan,
    collate,
    count_target_tokens,
    global_batch_indices,
    rank_micro_batches,
)
from overdrive.data.packing import build_lm_datasets
from overdrive.data.sources import load_raw
from overdrive.errors import TrainingDiverged, UsageError
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
from overdrive.parallel.distributed import guard, init_runtime, launch_env, shutdown
from overdrive.tracking import open_trackers, parse_report_to
from overdrive.train import checkpoint
from overdrive.train.build import (
    build_engine,
    build_model,
    check_model_source,
    main_process_first,
    resolve_strategy,
    resolve_tokenizer,
    seed_everything,
    share_tokenizer,
)
from overdrive.train.faults import maybe_fail
from overdrive.train.finish import (
    build_summary,
    evaluate,
    export_final,
    generate_sample,
    summary_line,
    truncate_metrics,
)
from overdrive.train.progress import Progress
from overdrive.train.rundir import claim_output_dir, clear_run, plan_output


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run `cfg` on this process (one of `torchrun`'s ranks, or alone) and return the summary (rank 0)."""
    output_dir, resume_from = plan_output(cfg)
    strategy = resolve_strategy(cfg)
    world = launch_env().world_size
    strategy.validate(world)
    check_model_source(cfg, strategy.tp_degree(world))
    runtime = init_runtime(strategy)  # validates the strategy before any process group starts
    try:
        with guard(runtime), contextlib.ExitStack() as cleanup:
            return run(cfg, strategy, runtime, output_dir, resume_from, cleanup)
    finally:
        shutdown()


def run(
    cfg: TrainConfig,
    strategy: Strategy,
    runtime: Runtime,
    output_dir: Path,
    resume_from: Path | None,
    cleanup: contextlib.ExitStack,
) -> dict[str, Any]:
    seed_everything(cfg.seed, cfg.deterministic)

    # data and tokenizer
    raw, text_column, source = load_raw(
        dataset=cfg.dataset,
        dataset_config=cfg.dataset_config,
        train_file=cfg.train_file,
        validation_file=cfg.validation_file,
        text_column=cfg.text_column,
        validation_split_percentage=cfg.validation_split_percentage,
        seed=cfg.seed,
        cache_dir=cfg.cache_dir,
    )
    tokenizer = resolve_tokenizer(cfg, raw["train"][text_column], output_dir if resume_from else None)
    tokenizer = share_tokenizer(tokenizer, runtime)
    with main_process_first(runtime):  # rank 0 fills the datasets cache, the others read it
        lm = build_lm_datasets(raw, text_column, tokenizer, cfg.block_size, cfg.packing)
    train_rows = first_rows(lm["train"], cfg.max_train_samples)
    if "validation" in lm:
        lm["validation"] = first_rows(lm["validation"], cfg.max_eval_samples)
    micro_batch_size, _ = strategy.resolve_batch(cfg.global_batch_size, runtime.dp_size, cfg.micro_batch_size)
    plan = BatchPlan(cfg.global_batch_size, micro_batch_size, runtime.dp_size)
    steps_per_epoch = len(train_rows) // cfg.global_batch_size
    if steps_per_epoch == 0:
        raise UsageError(
            f"the training data has {len(train_rows)} rows of {cfg.block_size} tokens, fewer than one global "
            f"batch ({cfg.global_batch_size}); lower --global-batch-size or --block-size, or add data"
        )
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_train_epochs * steps_per_epoch))

    # model and engine
    model, fill = build_model(cfg, len(tokenizer), runtime)
    n_params, n_compute_params = count_parameters(model)
    mc = model.config
    flops_tok = flops_per_token(n_compute_params, mc.num_hidden_layers, mc.hidden_size, cfg.block_size)
    engine = build_engine(model, cfg, strategy, runtime, total_steps, micro_batch_size, fill)

    # from here on the run writes to disk, holding the output dir until it ends
    cleanup.enter_context(claim_output_dir(cfg, runtime, output_dir, resume_from))
    start_step = 0
    if resume_from is not None:
        start_step = checkpoint.load(engine, resume_from)["step"]
        if runtime.is_main:
            truncate_metrics(output_dir / "metrics.jsonl", start_step)
    elif runtime.is_main:
        clear_run(output_dir)
        tokenizer.save_pretrained(str(output_dir / "tokenizer"))
    if runtime.is_main:
        write_text(output_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tracker = cleanup.enter_context(
        open_trackers(
            parse_report_to(cfg.report_to) if runtime.is_main else [],
            output_dir,
            cfg.to_dict(),
            output_dir.name,
            resume_step=start_step if resume_from is not None else None,
        )
    )
    writer = (
        MetricsWriter(output_dir / "metrics.jsonl", append=resume_from is not None, tracker=tracker)
        if runtime.is_main
        else None
    )
    log = Progress(total_steps, start_step, enabled=runtime.is_main, quiet=cfg.quiet)
    log.info(
        f"model {n_params / 1e6:.1f}M params, {len(train_rows)} train rows of {cfg.block_size} tokens from "
        f"{source}, {total_steps} steps of {cfg.global_batch_size} rows (micro {micro_batch_size} × "
        f"{plan.accumulation_steps} accumulation × {runtime.dp_size} data-parallel ranks; "
        f"{runtime.dims.describe()}) -> {output_dir}"
    )

    peak = peak_tflops(runtime.device)
    tokens_per_step = cfg.global_batch_size * cfg.block_size
    warmup = 2 if strategy.compile else 1  # first steps pay for compilation and allocator warm-up
    # at the start, not again when resuming a finished run (its final eval follows)
    first_eval = (
        evaluate(engine, lm["validation"], cfg, runtime, micro_batch_size)
        if "validation" in lm and start_step < total_steps
        else None
    )
    if first_eval and writer:
        writer.write({"step": start_step, **first_eval})
    timed_tokens, timed_seconds, window_tokens, window_seconds = 0, 0.0, 0, 0.0
    loss_value = float("nan")
    started = time.perf_counter()
    engine.model.train()
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        micro_batches = [
            collate(train_rows[idx])
            for idx in rank_micro_batches(
                global_batch_indices(len(train_rows), plan, cfg.seed, step), plan, runtime.dp_rank
            )
        ]
        loss_value, grad_norm, lr = train_step(engine, micro_batches, cfg.max_grad_norm)
        if not math.isfinite(loss_value):
            kept = checkpoint.list_checkpoints(output_dir)
            raise TrainingDiverged(
                f"loss became {loss_value} at step {step + 1}; stopped with "
                + (f"the last good checkpoint {kept[-1]} kept" if kept else "no checkpoint written")
                + "; lower --learning-rate or add --warmup-steps and start again"
            )
        elapsed = time.perf_counter() - t0
        done = step + 1
        if step - start_step >= warmup:
            timed_tokens += tokens_per_step
            timed_seconds += elapsed
            window_tokens += tokens_per_step
            window_seconds += elapsed
        log.advance(loss_value)

        if done == start_step + 1 or done % cfg.logging_steps == 0 or done == total_steps:
            tps = window_tokens / window_seconds if window_seconds > 0 else None
            per_device = tps / runtime.world_size if tps else None
            tflops = per_device * flops_tok / 1e12 if per_device else None
            record = {
                "step": done,
                "epoch": round(done / steps_per_epoch, 3),
                "loss": loss_value,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_sec": tps,
                "tokens_per_sec_per_device": per_device,
                "tflops_per_device": tflops,
                "mfu": tflops / peak if (tflops and peak) else None,
                "peak_memory_bytes": peak_memory_bytes(runtime.device),
                "elapsed_sec": time.perf_counter() - started,
            }
            if writer:
                writer.write(record)
            log.metrics(record)
            window_tokens, window_seconds = 0, 0.0
        if cfg.eval_steps and done % cfg.eval_steps == 0 and done != total_steps and "validation" in lm:
            result = evaluate(engine, lm["validation"], cfg, runtime, micro_batch_size)
            if writer:
                writer.write({"step": done, **result})
            log.info(
                f"eval at step {done}: loss {result['eval_loss']:.4f}, ppl {result['eval_perplexity']:.2f}"
            )
            engine.model.train()
        if cfg.save_steps and done % cfg.save_steps == 0 and done != total_steps:
            checkpoint.save(
                engine,
                output_dir,
                done,
                {"consumed_samples": done * cfg.global_batch_size},
                cfg.save_total_limit,
            )
        maybe_fail(done, runtime)
    log.close()
    wall = time.perf_counter() - started

    final_eval = (
        evaluate(engine, lm["validation"], cfg, runtime, micro_batch_size) if "validation" in lm else None
    )
    if final_eval and writer:
        writer.write({"step": total_steps, **final_eval})
    if cfg.save_steps and start_step < total_steps:
        checkpoint.save(
            engine,
            output_dir,
            total_steps,
            {"consumed_samples": total_steps * cfg.global_batch_size},
            cfg.save_total_limit,
        )
    if writer:
        writer.close()
    final_dir = output_dir / "final"
    if cfg.export:
        export_final(engine, tokenizer, final_dir)
    sample = generate_sample(engine, tokenizer, final_dir if cfg.export else None, cfg)

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
        first_eval,
        final_eval,
        total_steps,
        timed_tokens,
        timed_seconds,
        wall,
        runtime,
        n_params,
        flops_tok,
        source,
        output_dir,
        plan,
    )
    write_json(output_dir / "summary.json", summary)
    log.info(summary_line(summary))
    return summary


def first_rows(rows: Dataset, limit: int | None) -> Dataset:
    """--max-train-samples / --max-eval-samples: the first `limit` packed rows."""
    return rows.select(range(min(limit, len(rows)))) if limit else rows


def train_step(
    engine: TrainEngine, micro_batches: list[dict[str, torch.Tensor]], max_grad_norm: float
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
    grad_norm = engine.step(max_grad_norm)
    return float(runtime.all_reduce_sum(step_loss, "dp")), grad_norm, lr
