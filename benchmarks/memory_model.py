"""Measured vs predicted peak memory of a real training step, per cell (issue 11, item 2).

Usage (from the repo root)::

    PYTHONPATH=src python benchmarks/memory_model.py            # all cells, ~2 minutes on 2 cores

Each cell builds the model as `overdrive train` does (meta device, parallelize, materialize), runs one warm-up
step (the optimizer state appears) and measures the second: forward + backward over the micro-batches, clip,
optimizer step. On CPU the measured value is the peak of live tensor bytes (overdrive.search.measure), with
the process's peak RSS beside it; the prediction is `overdrive.search.memory.estimate` for the same
strategy. Multi-rank cells run under torchrun (2 gloo ranks, one thread each) and report the largest rank.
Results go to stdout and benchmarks/results/memory_model-cpu.json. Acceptance: every cell within ±10%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results" / "memory_model-cpu.json"
TOLERANCE = 0.10
SEQ = 256

CONFIGS = {
    "tiny": dict(vocab_size=8000),  # the `tiny` preset (overdrive.modeling), vocabulary 8000
    "100m": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=32000,
        tie_word_embeddings=True,
    ),
}

# (config, strategy preset, overrides, micro batch, accumulation, ranks); "lora_r" in the overrides trains
# LoRA adapters (all-linear) on the frozen model instead of the model
CELLS: list[tuple[str, str, dict, int, int, int]] = [
    ("tiny", "single", {}, 1, 1, 1),
    ("tiny", "single", {}, 4, 1, 1),
    ("tiny", "single", {}, 2, 2, 1),
    ("tiny", "single", {"activation_checkpointing": "full"}, 4, 1, 1),
    ("tiny", "single", {"kernels": True}, 4, 1, 1),
    ("tiny", "single", {"kernels": True, "activation_checkpointing": "full"}, 8, 1, 1),
    ("tiny", "single", {"activation_checkpointing": "every_k", "ac_every": 2}, 4, 1, 1),
    ("100m", "single", {}, 1, 1, 1),
    ("100m", "single", {}, 2, 1, 1),
    ("100m", "single", {"activation_checkpointing": "full"}, 2, 1, 1),
    ("100m", "single", {"kernels": True}, 2, 1, 1),
    ("100m", "single", {"kernels": True, "activation_checkpointing": "full"}, 4, 1, 1),
    ("tiny", "fsdp", {}, 2, 1, 2),
    ("tiny", "fsdp", {"kernels": True}, 2, 2, 2),
    ("tiny", "deepspeed-zero3", {}, 2, 1, 2),
    ("tiny", "single", {"activation_checkpointing": "selective"}, 4, 1, 1),
    ("tiny", "single", {"activation_checkpointing": "selective", "kernels": True}, 8, 1, 1),
    ("tiny", "single", {"lora_r": 16}, 4, 1, 1),
    ("100m", "single", {"lora_r": 16}, 2, 1, 1),
    ("100m", "single", {"lora_r": 16, "kernels": True}, 4, 1, 1),
]


def llama_config(name: str):  # noqa: ANN201
    from transformers import LlamaConfig

    from overdrive.modeling import LLAMA_PRESETS

    return LlamaConfig(**LLAMA_PRESETS.get(name, {}), **CONFIGS[name])


def strategy_for(preset: str, overrides: dict):  # noqa: ANN201
    import dataclasses

    from overdrive.parallel.strategy import Strategy

    fields = {k: v for k, v in overrides.items() if k != "lora_r"}
    return dataclasses.replace(Strategy.from_name_or_path(preset), **fields)


def predict(cell: tuple) -> dict:
    from overdrive.search.layout import Layout
    from overdrive.search.memory import estimate
    from overdrive.search.shape import ModelShape

    name, preset, overrides, micro, accum, ranks = cell
    lora = int(overrides.get("lora_r", 0))
    layout = Layout.from_strategy(strategy_for(preset, overrides), ranks, micro, accum, lora_rank=lora)
    return estimate(ModelShape.from_config(llama_config(name)), layout, SEQ, cuda=False).to_dict()


def measure_here(cell: tuple) -> dict:
    from overdrive.search.measure import measure_step

    name, preset, overrides, micro, accum, _ = cell
    lora = int(overrides.get("lora_r", 0))
    result = measure_step(llama_config(name), strategy_for(preset, overrides), SEQ, micro, accum, lora_rank=lora)
    return {"peak": result.peak_bytes, "start": result.start_bytes, "rss": result.rss_peak_bytes}


def measure(cell: tuple) -> dict:
    """One process per cell (a fresh allocator and RSS); torchrun for multi-rank cells."""
    ranks = cell[-1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank{rank}.json"
        worker = [str(HERE), "--worker", json.dumps(cell), "--out", str(out)]
        if ranks == 1:
            cmd = [sys.executable, *worker]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
            cmd += ["--master-port", str(29500 + os.getpid() % 1000), *worker]
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        per_rank = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
    return max(per_rank, key=lambda r: r["peak"])


def worker(cell_json: str, out: str) -> None:
    import torch.distributed as dist

    cell = tuple(json.loads(cell_json))
    result = measure_here(cell)
    rank = dist.get_rank() if dist.is_initialized() else 0
    Path(out.format(rank=rank)).write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def label(cell: tuple) -> str:
    name, preset, overrides, micro, accum, ranks = cell
    extra = ",".join(f"{k}={v}" for k, v in overrides.items())
    return f"{name} {preset}{'[' + extra + ']' if extra else ''} b{micro}x{accum} r{ranks}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument(
        "--only", type=int, nargs="*", help="cell indices to (re)run, merged into the results"
    )
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.out)
        return 0
    rows, mib = [], 2**20
    print(f"{'cell':64s} {'measured':>9s} {'predicted':>9s} {'error':>7s} {'RSS':>8s}  phase (MiB)")
    for i, cell in enumerate(CELLS):
        if args.only is not None and i not in args.only:
            continue
        start = time.perf_counter()
        measured, predicted = measure(cell), predict(cell)
        error = predicted["live"] / measured["peak"] - 1
        rows.append(
            {
                "cell": label(cell),
                "measured_bytes": measured["peak"],
                "rss_peak_bytes": measured["rss"],
                "predicted_bytes": predicted["live"],
                "relative_error": error,
                "prediction": predicted,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        print(
            f"{label(cell):64s} {measured['peak'] / mib:9.1f} {predicted['live'] / mib:9.1f} {error:+7.1%} "
            f"{measured['rss'] / mib:8.0f}  {predicted['phase']}",
            flush=True,
        )
    if args.only is not None and RESULTS.is_file():  # --only: merge these cells into the committed results
        fresh = {r["cell"] for r in rows}
        rows = [r for r in json.loads(RESULTS.read_text())["cells"] if r["cell"] not in fresh] + rows
    worst = max(rows, key=lambda r: abs(r["relative_error"]))
    ok = abs(worst["relative_error"]) <= TOLERANCE
    print(
        f"worst relative error {worst['relative_error']:+.1%} ({worst['cell']}) over {len(rows)} cells; "
        f"{'PASS' if ok else 'FAIL'} (±{TOLERANCE:.0%})"
    )
    import torch

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "seq": SEQ,
        "torch": torch.__version__,
        "tolerance": TOLERANCE,
        "worst_relative_error": worst["relative_error"],
        "cells": rows,
    }
    RESULTS.write_text(json.dumps(payload, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
