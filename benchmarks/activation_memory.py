"""Peak live tensor memory and step time of one forward+backward under each memory axis of a strategy.

Usage (from the repo root)::

    PYTHONPATH=src python benchmarks/activation_memory.py                 # ~110M Llama, seq 512, batch 2
    PYTHONPATH=src python benchmarks/activation_memory.py --batch 1 --layers 4

The model is a Llama built from a config with random weights (hidden 768, 12 layers, 12 heads, SwiGLU 2048,
vocabulary 32000 tied: ~110M parameters), fp32, sdpa attention. Each mode is applied through
`overdrive.parallel.parallelize` exactly as a run applies it: no recompute, selective (op-level) recompute,
full recompute, every_k 2, and activation offload (`save_on_cpu` around forward+backward).

Memory: on CPU, `torch.distributed._tools.mem_tracker.MemTracker` follows every tensor storage that is
allocated and freed during one real forward+backward and reports the peak of the live bytes, split into
parameters, gradients and activations (+ temporaries) at that peak. On CUDA the allocator's
`max_memory_allocated`. Time: the median of `--repeats` untracked steps after one warm-up step, wall clock and
(what the ratio uses on CPU, since other processes on a shared machine stretch the wall clock) the process's
CPU time; run it with OMP_NUM_THREADS=1 there so that the CPU time counts no idle spinning threads.

On a CPU the host *is* the device, so activation offload cannot lower the peak there (save_on_cpu keeps CPU
tensors as they are); the "to host" column counts the bytes its pack hook handed over, i.e. what a GPU run
would copy to pinned host memory per step. Results go to stdout and benchmarks/results/activation_memory-<dev>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results"
MODES: dict[str, dict[str, Any]] = {
    "none": {},
    "selective": {"activation_checkpointing": "selective"},
    "full": {"activation_checkpointing": "full"},
    "every_k 2": {"activation_checkpointing": "every_k", "ac_every": 2},
    "offload": {"activation_offload": True},
}


def build_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=args.seq,
        tie_word_embeddings=True,
    )
    config.attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).float()


def counting_offload(device: torch.device, moved: list[int]) -> contextlib.AbstractContextManager[None]:
    """overdrive's activation offload context, counting the bytes its pack hook receives."""
    from overdrive.parallel.offload import activation_offload

    hooks = activation_offload(device)
    pack = hooks.pack_hook

    def counted(tensor: torch.Tensor) -> Any:
        moved[0] += tensor.nbytes
        return pack(tensor)

    hooks.pack_hook = counted
    return hooks


def prepare(mode: str, args: argparse.Namespace, device: torch.device):  # noqa: ANN201
    """(model, loss-context factory) with the mode applied by `parallelize`, as in a training run."""
    from overdrive.core.runtime import Runtime
    from overdrive.parallel import Strategy, parallelize

    model = build_model(args, device)
    result = parallelize(model, Strategy(**MODES[mode]), Runtime(device=device))
    return model, result.loss_context or contextlib.nullcontext


def step(model: torch.nn.Module, context: Callable, ids: torch.Tensor) -> float:
    with context():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


def measure_memory(mode: str, args: argparse.Namespace, device: torch.device, ids: torch.Tensor) -> dict:
    model, context = prepare(mode, args, device)
    moved = [0]
    if mode == "offload":
        context = lambda: counting_offload(device, moved)  # noqa: E731  (same save_on_cpu, counted)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = step(model, context, ids)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"loss": loss, "peak_bytes": peak, "activation_bytes": peak - base, "to_host_bytes": moved[0]}
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        loss = step(model, context, ids)
    at_peak = tracker.get_tracker_snapshot("peak")[device]
    return {
        "loss": loss,
        "peak_bytes": at_peak["Total"],
        "activation_bytes": at_peak[_MemRefType.ACT] + at_peak[_MemRefType.TEMP],
        "gradient_bytes_at_peak": at_peak[_MemRefType.GRAD],
        "parameter_bytes": at_peak[_MemRefType.PARAM],
        "to_host_bytes": moved[0],
    }


def measure_time(mode: str, args: argparse.Namespace, device: torch.device, ids: torch.Tensor) -> dict:
    """Median wall seconds per step, and on CPU the process CPU seconds (robust to other load)."""
    model, context = prepare(mode, args, device)
    wall, cpu = [], []
    for _ in range(1 + args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        step(model, context, ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"step_seconds": statistics.median(wall[1:]), "step_cpu_seconds": statistics.median(cpu[1:])}


def table(rows: list[dict]) -> str:
    none = rows[0]
    mib = 2**20
    lines = [
        "| mode | peak live MiB | × none | activations at peak MiB | × none | to host MiB | step s | "
        "step CPU s | × none |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['peak_bytes'] / mib:.0f} | {r['peak_bytes'] / none['peak_bytes']:.2f} | "
            f"{r['activation_bytes'] / mib:.0f} | {r['activation_bytes'] / none['activation_bytes']:.2f} | "
            f"{r['to_host_bytes'] / mib:.0f} | {r['step_seconds']:.2f} | {r['step_cpu_seconds']:.2f} | "
            f"{r['step_cpu_seconds'] / none['step_cpu_seconds']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    params = sum(p.numel() for p in build_model(args, torch.device("meta")).parameters())
    print(f"Llama {params / 1e6:.1f}M parameters, batch {args.batch} × seq {args.seq}, fp32, {device}")
    load_before = os.getloadavg()
    rows = []
    for mode in args.modes.split(","):
        row = {"mode": mode, **measure_memory(mode, args, device, ids)}
        row.update(measure_time(mode, args, device, ids))
        rows.append(row)
        print(
            f"  {mode}: peak {row['peak_bytes'] / 2**20:.0f} MiB, step {row['step_seconds']:.2f} s",
            flush=True,
        )
    losses = {r["loss"] for r in rows}
    assert max(losses) - min(losses) <= 1e-4, f"modes disagree on the loss: {losses}"
    print(table(rows))
    if args.no_save:
        return
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"activation_memory-{device.type}.json"
    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        # other work on the machine slows the steps (not the byte counts): 1-minute load before and after
        "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    setup = {k: v for k, v in vars(args).items() if k not in ("no_save", "modes")}
    out.write_text(
        json.dumps({"parameters": params, "setup": setup, "env": env, "rows": rows}, indent=2) + "\n"
    )
    print(f"wrote {out.relative_to(HERE.parent.parent)}")


if __name__ == "__main__":
    main()
