"""`overdrive bench`: HF Trainer, HF Trainer + DeepSpeed ZeRO-3 and overdrive (any strategies) on one
workload, one table.

Registered in `overdrive.cli` with `add_bench_parser(sub)` and `COMMANDS["bench"] = run_bench`.
"""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path

from overdrive.errors import UsageError


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `bench` subcommand; returns its parser."""
    from overdrive.bench.presets import PRESETS

    p = subparsers.add_parser(
        "bench",
        help="throughput table: HF Trainer vs HF+DeepSpeed ZeRO-3 vs overdrive on the same workload",
        description="Run one workload under several systems, each cell in its own process; write bench.md, "
        "bench.json and bench.png.",
    )
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="workload preset (default: cpu-smoke without a GPU, llama3.2-1b-seq4096 with one)",
    )
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    w = p.add_argument_group("workload (overrides the preset)")
    w.add_argument(
        "--model-config", help="overdrive model preset or config.json (from-scratch init, saved once)"
    )
    w.add_argument("--seq-len", type=int, help="tokens per row")
    w.add_argument("--batch-sizes", help="global batch sizes, comma-separated (e.g. 8,16,24)")
    w.add_argument(
        "--micro-batch-size", type=int, help="rows per device per forward (default: global / nproc)"
    )
    w.add_argument("--steps", type=int, help="measured optimizer steps per cell")
    w.add_argument("--warmup-steps", type=int, help="optimizer steps run before timing starts (>= 1)")
    w.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="autocast precision for every system; auto: overdrive's --precision auto, and each HF system "
        "runs fp32 and bf16 with the faster counted (default: the preset's; cpu-smoke auto)",
    )
    w.add_argument("--attn-implementation", choices=("eager", "sdpa", "flash_attention_2"))
    w.add_argument("--learning-rate", type=float, help="constant learning rate (default 1e-3)")
    w.add_argument(
        "--max-grad-norm", type=float, help="clipping for every system, DeepSpeed included (default 1.0)"
    )
    w.add_argument("--seed", type=int, help="seed of the initial weights and the row order (default 42)")
    w.add_argument("--nproc", type=int, help="processes per cell, one per GPU (default: GPUs visible, or 1)")
    w.add_argument(
        "--threads", type=int, help="CPU threads per process for every system (default on CPU: cores / nproc)"
    )
    d = p.add_argument_group("data (default: CPython's documentation topics, repeated as needed)")
    d.add_argument("--train-file", help="txt, json/jsonl, csv or parquet")
    d.add_argument("--dataset", help="datasets hub name")
    d.add_argument("--dataset-config", help="datasets config name")
    d.add_argument("--text-column", help="column holding the text")
    d.add_argument("--tokenizer", help="tokenizer id or dir (default: a BPE trained once on the bench text)")
    d.add_argument("--vocab-size", type=int, help="vocab of that BPE (default 8000)")
    s = p.add_argument_group("systems")
    s.add_argument("--systems", default="hf-trainer,hf-deepspeed,overdrive", help="comma-separated columns")
    s.add_argument(
        "--overdrive-args",
        default=None,
        help="`overdrive train` flags of the overdrive column (default: none, i.e. overdrive's --strategy "
        "auto; on several processes --strategy auto explicitly, so that the column runs on all of them)",
    )
    s.add_argument(
        "--overdrive-strategies",
        default=None,
        metavar="S1,S2",
        help="one overdrive column per strategy (preset name or YAML file), e.g. single,fsdp,tp,pp,pp-fsdp: "
        "named overdrive-S, each with the --overdrive-args flags (default --compile --kernels) plus --strategy S, "
        "launched on 1 process for single and on --nproc otherwise; cells a strategy cannot run on --nproc "
        "are reported skipped with the reason",
    )
    s.add_argument(
        "--overdrive-variant",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="extra overdrive column `overdrive-NAME` with these flags (repeatable)",
    )
    s.add_argument("--timeout", type=float, help="seconds per cell before it is killed and marked timeout")
    s.add_argument(
        "--repeats", type=int, default=1, help="run every cell N times (round-robin) and report the fastest"
    )
    o = p.add_argument_group("output")
    o.add_argument("--output-dir", help="default runs/bench-<timestamp>")
    o.add_argument("--overwrite", action="store_true", help="replace an earlier bench in --output-dir")
    o.add_argument(
        "--keep-work", action="store_true", help="keep the initial model and token rows under work/"
    )
    o.add_argument("--dry-run", action="store_true", help="resolve the workload, print it and exit")
    return p


def build_workload(args: argparse.Namespace):  # -> Workload (import kept lazy for a fast --help)
    import torch

    from overdrive.bench.plan import plan_workload
    from overdrive.bench.presets import (
        PRESETS,
        Workload,
        parse_batch_sizes,
        parse_systems,
        parse_variant,
        validate,
    )
    from overdrive.bench.runner import check_overdrive_args

    gpus = torch.cuda.device_count()
    device = "cuda" if gpus else "cpu"
    preset = PRESETS[args.preset or ("llama3.2-1b-seq4096" if gpus else "cpu-smoke")]
    nproc = args.nproc or (gpus if gpus else 1)
    if device == "cpu" and nproc > 1 and args.nproc is None:
        nproc = 1
    attn = args.attn_implementation
    if attn is None:
        import importlib.util

        attn = "flash_attention_2" if gpus and importlib.util.find_spec("flash_attn") else "sdpa"
    systems = parse_systems(args.systems, device, nproc, args.overdrive_args, args.overdrive_strategies)
    systems += [parse_variant(v) for v in args.overdrive_variant]
    names = [s.name for s in systems]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(
            f"two columns are named {', '.join(twice)}; list each strategy once and give each "
            "--overdrive-variant its own NAME"
        )
    for spec in systems:
        if spec.kind == "overdrive":
            check_overdrive_args(spec)
    uses_preset_model = args.model_config is None
    w = Workload(
        preset=preset.name if uses_preset_model else None,
        model_config=args.model_config or preset.model_config,
        seq_len=args.seq_len or preset.seq_len,
        batch_sizes=parse_batch_sizes(args.batch_sizes) if args.batch_sizes else preset.batch_sizes,
        steps=args.steps if args.steps is not None else preset.steps,
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else preset.warmup_steps,
        precision=args.precision or preset.precision,
        device=device,
        nproc=nproc,
        micro_batch_size=args.micro_batch_size,
        attn_implementation=attn,
        learning_rate=args.learning_rate if args.learning_rate is not None else 1e-3,
        max_grad_norm=args.max_grad_norm if args.max_grad_norm is not None else 1.0,
        seed=args.seed if args.seed is not None else 42,
        vocab_size=args.vocab_size or preset.vocab_size,
        tokenizer=args.tokenizer,
        train_file=args.train_file,
        dataset=args.dataset,
        dataset_config=args.dataset_config,
        text_column=args.text_column,
        timeout=args.timeout or preset.timeout,
        repeats=args.repeats,
        threads=args.threads or (cpu_cores() // nproc or 1 if device == "cpu" else None),
        systems=tuple(systems),
    )
    validate(w)
    w = plan_workload(w)  # each overdrive column's strategy: processes, tp/pp, batch split; fails up front
    if w.attn_implementation == "flash_attention_2":
        from overdrive.modeling import check_attn

        check_attn(w.attn_implementation)
    if w.learning_rate <= 0 or w.max_grad_norm < 0:
        raise UsageError("--learning-rate must be positive and --max-grad-norm not negative")
    return w


def cpu_cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_bench(args: argparse.Namespace) -> int:
    """Resolve the workload, refuse to clobber, run every cell, print the table."""
    import yaml

    from overdrive.bench.presets import PRESETS

    if args.list_presets:
        for p in PRESETS.values():
            sizes = ",".join(map(str, p.batch_sizes))
            print(
                f"{p.name}: {p.description}; batch sizes {sizes}; {p.warmup_steps}+{p.steps} steps; {p.device}"
            )
        return 0
    w = build_workload(args)
    if args.dry_run:
        from overdrive.bench.plan import describe_cells

        print(yaml.safe_dump({**w.to_dict(), "cells": describe_cells(w)}, sort_keys=False), end="")
        return 0
    from overdrive.bench.runner import plan_output
    from overdrive.bench.runner import run_bench as run_all

    output_dir = Path(args.output_dir or Path("runs") / datetime.now().strftime("bench-%Y%m%d-%H%M%S"))
    plan_output(output_dir, args.overwrite)
    output_dir.mkdir(parents=True, exist_ok=True)
    bench = run_all(w, output_dir, keep_work=args.keep_work)
    md = (output_dir / "bench.md").read_text()
    print(md.split("## Ratio to HF Trainer")[0].rstrip())
    print(f"\nwrote {output_dir / 'bench.md'}, {output_dir / 'bench.json'}, {output_dir / 'bench.png'}")
    return 0 if any(r["status"] == "ok" for r in bench["rows"]) else 1
