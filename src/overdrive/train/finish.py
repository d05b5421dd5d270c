"""Evaluation, HF export, the closing sample and the run summary."""

from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from overdrive import __version__
from overdrive.atomic import staged_dir, write_text
from overdrive.config import TrainConfig
from overdrive.core.engine import TrainEngine
from overdrive.core.runtime import Runtime
from overdrive.data.loader import BatchPlan, collate, count_target_tokens
from overdrive.metrics import device_name, read_metrics
from overdrive.parallel.adapter_outputs import export_final_adapter, has_adapters


@torch.no_grad()
def evaluate(
    engine: TrainEngine, rows: Dataset, cfg: TrainConfig, runtime: Runtime, micro_batch_size: int
) -> dict[str, float]:
    """Token-weighted mean loss over the validation rows (data-parallel ranks take interleaved batches)."""
    engine.model.eval()
    m = cfg.eval_batch_size or micro_batch_size
    starts = list(range(0, len(rows), m))
    if cfg.max_eval_batches:
        starts = starts[: cfg.max_eval_batches]
    total = torch.zeros(2, dtype=torch.float64)
    # Every rank runs the same number of forwards (sharded engines all-gather inside each one); a rank
    # without a batch of its own in the last round repeats batch 0 and counts nothing.
    rounds = math.ceil(len(starts) / runtime.dp_size)
    for r in range(rounds):
        i = r * runtime.dp_size + runtime.dp_rank
        own = i < len(starts)
        batch = collate(rows[starts[i if own else 0] : starts[i if own else 0] + m])
        n = count_target_tokens(batch)
        loss = engine.eval_loss(batch, n)
        if own and n > 0:
            total += torch.tensor([float(loss) * n, n], dtype=torch.float64)
    total = runtime.all_reduce_sum(total, "dp")
    engine.model.train()
    mean = float(total[0] / total[1]) if total[1] > 0 else float("nan")
    return {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50.0))}


def export_final(engine: TrainEngine, tokenizer: PreTrainedTokenizerBase, final_dir: Path) -> None:
    """save_pretrained (safetensors) + tokenizer, swapped into place in one rename."""
    state = engine.full_state_dict()
    if not engine.runtime.is_main:
        return
    model = engine.unwrapped_model()
    with staged_dir(final_dir) as tmp:
        if has_adapters(model):  # the peft adapter and its base reference (overdrive.parallel.adapter_outputs)
            export_final_adapter(model, state, tmp, final_dir)
        else:
            model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))


def generate_sample(
    engine: TrainEngine, tokenizer: PreTrainedTokenizerBase, final_dir: Path | None, cfg: TrainConfig
) -> str:
    """A seeded top-k sample continuing --prompt, from the exported model when there is one (proves it loads).

    Greedy decoding of a small model collapses into newlines or one repeated word; sampling shows more.
    """
    if not engine.runtime.is_main or cfg.max_new_tokens == 0:
        return ""
    if final_dir is None and engine.runtime.world_size > 1:
        return ""  # a sharded model generates only with every rank taking part
    if final_dir is not None:
        model = AutoModelForCausalLM.from_pretrained(str(final_dir), use_safetensors=True)
    else:
        model = engine.unwrapped_model()
    model.eval()
    device = next(model.parameters()).device
    inputs = prompt_inputs(tokenizer, cfg.prompt)
    if inputs is None:
        return ""
    inputs = {k: v.to(device) for k, v in inputs.items()}
    generator_state = torch.get_rng_state()
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=True,
            top_k=40,
            temperature=0.8,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )
    torch.set_rng_state(generator_state)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def prompt_inputs(tokenizer: PreTrainedTokenizerBase, prompt: str) -> dict[str, torch.Tensor] | None:
    """Token ids to continue; an empty prompt starts from BOS (or EOS, which also ends a document)."""
    inputs = dict(tokenizer(prompt, return_tensors="pt"))
    if inputs["input_ids"].shape[1] > 0:
        return inputs
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        return None  # nothing to start from: no sample
    ids = torch.tensor([[start]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def truncate_metrics(path: Path, step: int) -> None:
    """On resume from `step`, keep what was logged up to the checkpoint so the file reads as one run.

    Train lines up to `step` stay; eval lines at `step` go too, because the resumed run evaluates there
    again (or, resuming a finished run, writes the final eval again).
    """
    if not path.is_file():
        return
    import json

    kept = [r for r in read_metrics(path) if r["step"] < step or (r["step"] == step and "eval_loss" not in r)]
    write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def versions() -> dict[str, str]:
    import datasets
    import transformers

    return {
        "overdrive": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "python": platform.python_version(),
    }


def build_summary(
    cfg: TrainConfig,
    records: list[dict[str, Any]],
    total_steps: int,
    timed_tokens: int,
    timed_seconds: float,
    wall_seconds: float,
    runtime: Runtime,
    n_params: int,
    flops_tok: float,
    source: str,
    output_dir: Path,
    plan: BatchPlan,
) -> dict[str, Any]:
    train = [r for r in records if "loss" in r]
    # metrics.jsonl is the record: a resumed run's first eval is the original run's, at its first step
    evals = sorted((r for r in records if "eval_loss" in r), key=lambda r: r["step"])
    first_eval = evals[0] if evals else None
    final_eval = evals[-1] if evals and evals[-1]["step"] == total_steps else None
    tps = timed_tokens / timed_seconds if timed_seconds > 0 else None
    return {
        "steps": total_steps,
        "first_train_loss": train[0]["loss"] if train else None,
        "final_train_loss": train[-1]["loss"] if train else None,
        "first_eval_loss": first_eval["eval_loss"] if first_eval else None,
        "first_eval_perplexity": first_eval["eval_perplexity"] if first_eval else None,
        "final_eval_loss": final_eval["eval_loss"] if final_eval else None,
        "final_eval_perplexity": final_eval["eval_perplexity"] if final_eval else None,
        "global_batch_size": plan.global_batch_size,  # rows per optimizer step = micro × ranks × accumulation
        "micro_batch_size": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.accumulation_steps,
        "tokens_trained": total_steps * cfg.global_batch_size * cfg.block_size,
        "tokens_per_sec": tps,
        "tokens_per_sec_per_device": tps / runtime.world_size if tps else None,
        "flops_per_token": flops_tok,
        "peak_memory_bytes": max((r.get("peak_memory_bytes") or 0 for r in train), default=None),
        "wall_time_sec": wall_seconds,
        "parameters": n_params,
        "data": source,
        "world_size": runtime.world_size,
        "device": device_name(runtime.device),
        "versions": versions(),
        "config": cfg.to_dict(),
        "output_dir": str(output_dir),
    }


def summary_line(summary: dict[str, Any]) -> str:
    parts = [f"done: {summary['steps']} steps in {summary['wall_time_sec']:.1f}s"]
    if summary["final_train_loss"] is not None:
        parts.append(f"train loss {summary['first_train_loss']:.3f} -> {summary['final_train_loss']:.3f}")
    if summary["final_eval_perplexity"] is not None:
        parts.append(
            f"eval ppl {summary['first_eval_perplexity']:.1f} -> {summary['final_eval_perplexity']:.1f}"
        )
    if summary["tokens_per_sec"]:
        parts.append(f"{summary['tokens_per_sec']:.0f} tok/s")
    return ", ".join(parts)
