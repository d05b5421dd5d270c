"""Peak RSS until the model is ready: one process building the full fp32 model vs meta, FSDP2, materialize.

Usage (from the repo root)::

    PYTHONPATH=src python benchmarks/memory_at_load.py                      # llama3.2-1b, vocab 32000
    PYTHONPATH=src python benchmarks/memory_at_load.py --vocab-size 128256  # the preset's real vocabulary

(a) "single": one process builds the preset the old way (`overdrive.modeling.build_from_config`: the full
    fp32 model on CPU, HF init). (b) "sharded": `torchrun --nproc-per-node N` ranks each build the model on
    `meta`, apply FSDP2 (`fully_shard` per decoder layer, then the root) on a 1-D gloo mesh, and `materialize`
    only their shards. Each process reports its peak RSS (`ru_maxrss`: the high-water mark of the whole
    process, so Python, torch and transformers count too) once the model is ready, and its RSS right after the
    imports. The issue's target: every rank's peak <= 0.6 x the single-process peak. The vocabulary
    defaults to 32000 (not the preset's 128256) to keep the run short; the embedding is then 6% of the
    parameters, not 21%.
Results go to stdout and to benchmarks/results/memory_at_load-vocab<V>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results"
TARGET_RATIO = 0.6


def rss_mb() -> float:
    """Current resident set size (MiB), from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def config_for(preset: str, vocab: int):  # noqa: ANN201
    from overdrive.modeling import preset_config

    config = preset_config(preset)
    config.vocab_size = vocab
    return config


def single(preset: str, vocab: int) -> dict:
    from overdrive.modeling import build_from_config

    after_imports, start = rss_mb(), time.perf_counter()
    model = build_from_config(config_for(preset, vocab), vocab, "sdpa", "float32")
    params = sum(p.numel() for p in model.parameters())
    return report("single", 0, after_imports, start, params, params)


def sharded(preset: str, vocab: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from overdrive.parallel.materialize import build_meta_model, materialize, meta_reference

    dist.init_process_group("gloo")
    after_imports, start = rss_mb(), time.perf_counter()
    model = build_meta_model(config_for(preset, vocab), "sdpa", "float32")
    reference = meta_reference(model)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    materialize(model, reference, seed=0, device="cpu")
    local = sum(p.to_local().numel() for p in model.parameters())
    out = report(
        "sharded", dist.get_rank(), after_imports, start, sum(p.numel() for p in model.parameters()), local
    )
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, out)
    dist.destroy_process_group()
    return {"ranks": gathered}


def report(kind: str, rank: int, after_imports: float, start: float, params: int, local: int) -> dict:
    return {
        "kind": kind,
        "rank": rank,
        "peak_rss_mb": round(peak_mb()),
        "rss_after_imports_mb": round(after_imports),
        "seconds": round(time.perf_counter() - start, 1),
        "parameters": params,
        "local_parameters": local,
    }


def run_child(args: argparse.Namespace, role: str, nproc: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)))
    child = [str(HERE), "--role", role, "--preset", args.preset, "--vocab-size", str(args.vocab_size)]
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    proc = subprocess.run(launcher + child, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{role} run failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(lines[0])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="llama3.2-1b")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--role", choices=["single", "sharded"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.role == "single":
        print(json.dumps(single(args.preset, args.vocab_size)))
        return
    if args.role == "sharded":
        out = sharded(args.preset, args.vocab_size)
        if os.environ.get("RANK", "0") == "0":
            print(json.dumps(out))
        return
    summarize(args, run_child(args, "single", 1), run_child(args, "sharded", args.nproc)["ranks"])


def summarize(args: argparse.Namespace, one: dict, ranks: list[dict]) -> None:
    print(f"{args.preset}, vocab {args.vocab_size}, fp32, {one['parameters'] / 1e9:.2f} B parameters")
    print(f"{'run':<22}{'peak RSS MiB':>14}{'after imports':>15}{'seconds':>9}{'ratio':>8}")
    print(
        f"{'single process':<22}{one['peak_rss_mb']:>14}{one['rss_after_imports_mb']:>15}{one['seconds']:>9}"
    )
    for r in ranks:
        ratio = r["peak_rss_mb"] / one["peak_rss_mb"]
        name = f"fsdp {len(ranks)} ranks, rank {r['rank']}"
        print(
            f"{name:<22}{r['peak_rss_mb']:>14}{r['rss_after_imports_mb']:>15}{r['seconds']:>9}{ratio:>8.2f}"
        )
    worst = max(r["peak_rss_mb"] for r in ranks) / one["peak_rss_mb"]
    verdict = "meets" if worst <= TARGET_RATIO else "MISSES"
    print(f"worst rank / single = {worst:.2f} ({verdict} the <= {TARGET_RATIO} target)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "preset": args.preset,
        "vocab_size": args.vocab_size,
        "single": one,
        "ranks": ranks,
        "ratio": worst,
    }
    (RESULTS / f"memory_at_load-vocab{args.vocab_size}.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
