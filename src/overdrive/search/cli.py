"""The `overdrive plan` subcommand: flags, input checks, the rich table and plan.json."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from overdrive.errors import UsageError

GIB = 2**30


def add_plan_parser(sub: Any) -> None:
    p = sub.add_parser("plan", help="predict memory and step time of every strategy before running")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a local HF model directory (its config.json is read, no weights)")
    src.add_argument("--model-config", help="preset (tiny, llama3.2-1b, llama3-8b, llama2-7b) or config.json")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary when the config has none (8000)")
    p.add_argument("--seq", type=int, default=256, help="tokens per row (default 256)")
    p.add_argument("--global-batch-size", type=int, default=8, help="rows per optimizer step (default 8)")
    p.add_argument("--device", help="cpu, a100-40g, a100-80g, h100, h200, ... (default: this machine)")
    p.add_argument("--gpus-per-node", type=int, default=1, help="devices per node (default 1)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument(
        "--lora-r", type=int, default=None, help="plan LoRA fine-tuning with adapters of this rank (all-linear)"
    )
    p.add_argument("--top", type=int, default=10, help="rows of the ranking to print (default 10)")
    p.add_argument("--output", help="write the ranking as JSON here (e.g. plan.json)")


def load_shape(args: argparse.Namespace) -> tuple[Any, str]:
    """The ModelShape of --model / --model-config (default tiny), built from the config alone."""
    from overdrive.modeling import preset_config
    from overdrive.search.shape import ModelShape

    if args.model:
        if not Path(args.model).is_dir():
            raise UsageError(
                f"--model {args.model} is not a directory; pass a local model directory or "
                "--model-config with a preset or config.json"
            )
        source = args.model
    else:
        source = args.model_config or "tiny"
    config = preset_config(source)
    if args.vocab_size is not None:
        config.vocab_size = args.vocab_size
    elif source == "tiny" or not getattr(config, "vocab_size", None):
        config.vocab_size = 8000
    return ModelShape.from_config(config), source


def check_args(args: argparse.Namespace) -> None:
    for name in ("seq", "global_batch_size", "gpus_per_node", "nodes", "top"):
        value = getattr(args, name)
        if value < 1:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} must be a positive whole number, got {value}")
    if args.lora_r is not None and args.lora_r < 1:
        raise UsageError(f"--lora-r must be a positive whole number, got {args.lora_r}")
    if args.vocab_size is not None and args.vocab_size < 2:
        raise UsageError(f"--vocab-size must be at least 2, got {args.vocab_size}")
    if args.output and Path(args.output).is_dir():
        raise UsageError(f"--output {args.output} is a directory; pass a file name such as plan.json")


def run_plan(args: argparse.Namespace) -> int:
    from overdrive.search.hardware import resolve
    from overdrive.search.plan import plan, shown, write_json

    start = time.perf_counter()
    check_args(args)
    device = resolve(args.device)
    shape, source = load_shape(args)
    world = args.nodes * args.gpus_per_node
    ranked = plan(
        shape, args.seq, args.global_batch_size, device, args.nodes, args.gpus_per_node, args.lora_r or 0
    )
    rows = shown(ranked, args.top)
    print_table(rows, ranked, args, device, shape, source, world)
    if args.output:
        meta = {
            "model": source,
            "seq": args.seq,
            "global_batch_size": args.global_batch_size,
            "device": device.name,
            "calibrated": device.calibrated,
            "nodes": args.nodes,
            "gpus_per_node": args.gpus_per_node,
            "device_memory_bytes": device.memory_bytes,
            "parameters": shape.total_params(),
            "lora_r": args.lora_r,
        }
        write_json(Path(args.output), ranked, meta, args.seq, args.global_batch_size, world)
    print(f"{len(ranked)} strategies, {sum(c.fits for c in ranked)} fit; {time.perf_counter() - start:.1f} s")
    return 0


def print_table(
    rows: list, ranked: list, args: argparse.Namespace, device: Any, shape: Any, source: str, world: int
) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (
        f"{source} ({shape.total_params() / 1e9:.2f} B params), seq {args.seq}, global batch "
        f"{args.global_batch_size}{f', LoRA r={args.lora_r}' if args.lora_r else ''}, {world} × {device.name} "
        f"({device.memory_bytes / GIB:.0f} GiB"
        f"{', calibrated' if device.calibrated else ''})"
    )
    table = Table(title=title, title_justify="left")
    unit, size = ("GiB", GIB) if max(c.memory.reserved for c in rows) >= 4 * GIB else ("MiB", 2**20)
    for col in (
        "#",
        "layout",
        "strategy",
        "prec",
        "mb×acc",
        "params",
        "grads",
        "optim",
        "acts",
        "loss",
        "comm",
        "other",
        f"peak {unit}",
        "fits",
        "step s",
        "tok/s/dev",
    ):
        table.add_column(col, justify="left" if col in ("layout", "strategy") else "right")
    for c in rows:
        m = c.memory
        rank = ranked.index(c) + 1
        table.add_row(
            str(rank),
            c.kind,
            c.strategy.describe(),
            c.precision,
            f"{c.micro}×{c.accum}",
            *(
                f"{v / size:.1f}"
                for v in (
                    m.params,
                    m.grads,
                    m.optimizer,
                    m.activations,
                    m.loss,
                    m.comm,
                    m.transient + m.margin,
                    m.reserved,
                )
            ),
            "[green]✓[/green]" if c.fits else "[red]✗[/red]",
            f"{c.time.total:.3g}",
            f"{c.tokens_per_second_per_device(args.seq, args.global_batch_size, world):,.0f}",
        )
    Console(width=220).print(table)
