"""Benchmark overdrive's kernels and a tiny-Llama train step against the HF reference, side by side.

Usage (from the repo root)::

    PYTHONPATH=src python benchmarks/kernels.py                 # everything, CPU (+ CUDA if present)
    PYTHONPATH=src python benchmarks/kernels.py --sections ce   # just the fused linear+CE acceptance case
    PYTHONPATH=src python benchmarks/kernels.py --quick         # fewer repetitions

Timing: variants run interleaved (round-robin) after warm-up, so background load hits them alike;
min and median of the rounds are reported and ratios use the median. Peak memory: on CPU a
``TorchDispatchMode`` counts the bytes of every live tensor storage created inside the measured call
(``overdrive.kernels._memory``); with ``--rss`` the CE case is also measured as the RSS high-water
mark of a fresh subprocess per variant. On CUDA ``torch.cuda.max_memory_allocated`` is used.
Results go to stdout and to a JSON file under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

from overdrive.kernels._memory import LiveTensorMemory
from overdrive.kernels.compile import compile_model
from overdrive.kernels.fused_linear_cross_entropy import (
    fused_linear_cross_entropy,
    reference_linear_cross_entropy,
)
from overdrive.kernels.rms_norm import reference_rms_norm, rms_norm
from overdrive.kernels.rope import apply_rotary_pos_emb, reference_apply_rotary_pos_emb
from overdrive.kernels.swiglu import reference_swiglu, swiglu
from overdrive.patches import patch_model

RESULTS: dict[str, Any] = {}


# ---------------------------------------------------------------------------------------------- tools
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(
    fns: dict[str, Callable[[], Any]], reps: int, warmup: int, device: str
) -> dict[str, dict[str, float]]:
    """Round-robin timing in ms: {name: {min, median}}."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: {"min_ms": min(v), "median_ms": statistics.median(v)} for k, v in times.items()}


def peak_mib(fn: Callable[[], Any], device: str) -> float:
    """Peak extra memory of one call (MiB)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with LiveTensorMemory() as mem:
        fn()
    return mem.peak_mib


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def table(title: str, rows: list[dict[str, Any]], ref_key: str = "reference") -> None:
    print(f"\n== {title}")
    print(
        f"{'variant':44s} {'median ms':>10s} {'min ms':>9s} {'peak MiB':>9s} {'speedup':>8s} {'mem ratio':>9s}"
    )
    ref = next((r for r in rows if r["variant"] == ref_key), rows[0])
    for r in rows:
        sp = ref["median_ms"] / r["median_ms"]
        mem = r.get("peak_mib")
        ratio = f"{mem / ref['peak_mib']:.3f}" if mem is not None and ref.get("peak_mib") else "-"
        mem_s = f"{mem:9.1f}" if mem is not None else f"{'-':>9s}"
        print(f"{r['variant']:44s} {r['median_ms']:10.1f} {r['min_ms']:9.1f} {mem_s} {sp:7.2f}x {ratio:>9s}")


# ---------------------------------------------------------------------------------------------- CE
def bench_ce(
    device: str, reps: int, n: int, h: int, v: int, autocast: bool, chunks: list[int | None]
) -> None:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, h, device=device, generator=g).requires_grad_()
    w = (torch.randn(v, h, device=device, generator=g) * 0.02).requires_grad_()
    t = torch.randint(0, v, (n,), device=device, generator=g)
    dtype = torch.bfloat16

    def make(fn: Callable[..., torch.Tensor], **kw: Any) -> Callable[[], list[torch.Tensor]]:
        def run() -> list[torch.Tensor]:
            with torch.autocast(device, dtype=dtype, enabled=autocast):
                loss = fn(x, w, t, **kw)
            return [loss, *torch.autograd.grad(loss, [x, w])]

        return run

    variants = {"reference": make(reference_linear_cross_entropy)}
    for c in chunks:
        variants[f"fused chunk={c or 'auto'}"] = make(fused_linear_cross_entropy, chunk_size=c)
    ref_out = variants["reference"]()
    rows = []
    timing = interleaved(variants, reps, 1, device)
    for name, fn in variants.items():
        out = fn()
        rows.append(
            {
                "variant": name,
                **timing[name],
                "peak_mib": peak_mib(fn, device),
                "loss_rel_err": rel(out[0], ref_out[0]),
                "grad_x_rel_err": rel(out[1], ref_out[1]),
                "grad_w_rel_err": rel(out[2], ref_out[2]),
            }
        )
    key = f"ce_{device}_{n}x{h}x{v}_{'bf16-autocast' if autocast else 'fp32'}"
    RESULTS[key] = rows
    table(
        f"fused linear+CE, {device}, tokens={n} hidden={h} vocab={v}, {'bf16 autocast' if autocast else 'fp32'}",
        rows,
    )
    for r in rows[1:]:
        print(
            f"   {r['variant']}: loss rel err {r['loss_rel_err']:.1e}, grad_x {r['grad_x_rel_err']:.1e}, "
            f"grad_w {r['grad_w_rel_err']:.1e}"
        )


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _rss_child(kind: str, n: int, h: int, v: int) -> None:
    """Subprocess body for --rss: one CE fwd+bwd, prints the peak-RSS increase (MiB).

    Uses /proc VmHWM (this process's own peak, reset via clear_refs) rather than ru_maxrss, which
    Linux carries over from the parent across fork+exec.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, generator=g).requires_grad_()
    w = (torch.randn(v, h, generator=g) * 0.02).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    before = _proc_status_kib("VmRSS")
    fn = reference_linear_cross_entropy if kind == "reference" else fused_linear_cross_entropy
    fn(x, w, t).backward()
    print((_proc_status_kib("VmHWM") - before) / 1024)


def bench_ce_rss(n: int, h: int, v: int) -> None:
    out = {}
    for kind in ("reference", "fused"):
        cmd = [sys.executable, __file__, "--rss-child", kind, str(n), str(h), str(v)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
        out[kind] = float(res.stdout.strip().splitlines()[-1])
    RESULTS[f"ce_rss_{n}x{h}x{v}_fp32"] = out
    print(
        f"   RSS high-water increase (fresh process): reference {out['reference']:.0f} MiB, "
        f"fused {out['fused']:.0f} MiB, ratio {out['fused'] / out['reference']:.3f}"
    )


# ---------------------------------------------------------------------------------------------- small kernels
def bench_small_kernels(device: str, reps: int) -> None:
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(*shape, device=device, generator=g).to(dtype).requires_grad_()

    for dtype in (torch.float32, torch.bfloat16):
        tag = str(dtype).replace("torch.", "")
        x, wn = rnd(8192, 1024, dtype=dtype), rnd(1024, dtype=torch.float32)
        gate, up = rnd(8192, 2816, dtype=dtype), rnd(8192, 2816, dtype=dtype)
        q, k = rnd(4, 16, 1024, 64, dtype=dtype), rnd(4, 4, 1024, 64, dtype=dtype)
        cos = torch.randn(4, 1024, 64, device=device, generator=g).to(dtype)
        sin = torch.randn(4, 1024, 64, device=device, generator=g).to(dtype)
        cases: dict[str, tuple[Callable[[Callable[..., Any]], None], dict[str, Callable[..., Any]]]] = {
            "rms_norm [8192x1024]": (
                lambda f, x=x, wn=wn: f(x, wn, 1e-6).sum().backward(),
                {"reference": reference_rms_norm, "overdrive": rms_norm},
            ),
            "swiglu [8192x2816]": (
                lambda f, gate=gate, up=up: f(gate, up).sum().backward(),
                {"reference": reference_swiglu, "overdrive": swiglu},
            ),
            "rope q[4,16,1024,64] k[4,4,1024,64]": (
                lambda f, q=q, k=k, cos=cos, sin=sin: sum(o.sum() for o in f(q, k, cos, sin)).backward(),
                {"reference": reference_apply_rotary_pos_emb, "overdrive": apply_rotary_pos_emb},
            ),
        }
        for title, (body, impls) in cases.items():
            fns = {name: (lambda f=f, body=body: body(f)) for name, f in impls.items()}
            timing = interleaved(fns, reps, 2, device)
            rows = [{"variant": n, **timing[n], "peak_mib": peak_mib(fn, device)} for n, fn in fns.items()]
            RESULTS[f"{title.split()[0]}_{device}_{tag}"] = rows
            table(f"{title} fwd+bwd, {device}, {tag}", rows)


# ---------------------------------------------------------------------------------------------- train step
def tiny_llama() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=8000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def bench_train_step(device: str, reps: int, variants_wanted: list[str]) -> None:
    base = tiny_llama().to(device).train()
    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, 8000, (8, 256), device=device, generator=g)
    specs = {  # name: (patched, compile mode, bf16 autocast)
        "hf eager fp32": (False, None, False),
        "overdrive eager fp32": (True, None, False),
        "hf eager bf16": (False, None, True),
        "overdrive eager bf16": (True, None, True),
        "overdrive + regional compile bf16": (True, "regional", True),
        "overdrive + full compile bf16": (True, "full", True),
        "hf + full compile bf16": (False, "full", True),
    }
    steps: dict[str, Callable[[], float]] = {}
    compile_s: dict[str, float] = {}
    for name in variants_wanted:
        patched, mode, bf16 = specs[name]
        model = copy.deepcopy(base)
        if patched:
            patch_model(model, strict=True)
        if mode is not None:
            compile_model(model, regional=mode == "regional")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model: Any = model, opt: Any = opt, bf16: bool = bf16) -> float:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        t0 = time.perf_counter()
        step()  # first step: compilation
        compile_s[name] = time.perf_counter() - t0
        steps[name] = step
    timing = interleaved(steps, reps, 1, device)
    rows = []
    for name in variants_wanted:
        row = {"variant": name, **timing[name], "first_step_s": compile_s[name]}
        if specs[name][1] is None:  # dispatch-mode accounting cannot see inside compiled graphs
            row["peak_mib"] = peak_mib(steps[name], device)
        rows.append(row)
    RESULTS[f"train_step_{device}"] = rows
    table(
        f"tiny-Llama train step (h256, 4 layers, 8q/4kv heads, vocab 8000, batch 8 x 256), {device}",
        rows,
        ref_key="hf eager bf16",
    )
    print("   first step (incl. compilation), s: " + ", ".join(f"{k}: {v:.1f}" for k, v in compile_s.items()))


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default="ce,kernels,step", help="comma list of ce,kernels,step")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--rss", action="store_true", help="also measure CE peak RSS in fresh subprocesses")
    parser.add_argument(
        "--step-variants", default="all", help="comma list of train-step variant names, or all"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's); 1 is steadier on shared cores",
    )
    parser.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/kernels-<device>.json)"
    )
    parser.add_argument("--rss-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        kind, n, h, v = args.rss_child
        _rss_child(kind, int(n), int(h), int(v))
        return
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = args.sections.split(",")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    reps = 3 if args.quick else 7
    load_before = os.getloadavg()
    t_start = time.time()
    for device in devices:
        if "ce" in sections:
            bench_ce(device, reps, 8192, 512, 32000, autocast=False, chunks=[None, 1024])
            if args.rss and device == "cpu":
                bench_ce_rss(8192, 512, 32000)
            bench_ce(device, reps, 2048, 256, 8000, autocast=True, chunks=[None])
        if "kernels" in sections:
            bench_small_kernels(device, reps)
        if "step" in sections:
            names = [
                "hf eager fp32",
                "overdrive eager fp32",
                "hf eager bf16",
                "overdrive eager bf16",
                "overdrive + regional compile bf16",
                "overdrive + full compile bf16",
            ]
            if args.step_variants != "all":
                names = args.step_variants.split(",")
            bench_train_step(device, 2 * reps, names)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    cpu_model = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.machine(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.machine()
    )
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": device_name,
        "cpu": cpu_model,
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_s": time.time() - t_start,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"kernels-{devices[-1]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": RESULTS}, indent=2, default=float))
    print(f"\nload average before/after: {load_before} / {meta['load_average_after']}; wrote {out}")


if __name__ == "__main__":
    main()
