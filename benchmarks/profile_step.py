"""Where one overdrive training step's time goes on the CPU: torch.profiler's top ops per variant.

    python benchmarks/profile_step.py [--preset tiny] [--micro 8] [--seq 256] [--variants plain,kernels]

Each variant (plain = HF modules, eager; kernels = overdrive's fused kernels; compile = + regional compile;
suffix :bf16 for bf16 autocast) builds the model as `overdrive train` does (meta, transforms, random init),
runs two untimed steps (forward+backward+AdamW step, as the training loop does), then profiles three steps
and prints the median step time and the ops with the most self CPU time. The numbers explain the
`overdrive bench` ratio in docs/bench.md ("auto vs HF Trainer").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from overdrive.config import TrainConfig
from overdrive.core.runtime import Runtime
from overdrive.modeling import preset_config
from overdrive.parallel import Strategy, build_engine
from overdrive.parallel.materialize import build_meta_model, materialize, meta_reference
from overdrive.search.auto_measure import random_batch
from overdrive.train.optim import make_optimizer


def engine_for(variant: str, preset: str, vocab: int) -> tuple[object, str]:
    name, _, precision = variant.partition(":")
    strategy = Strategy(kernels=name in ("kernels", "compile"), compile=name == "compile")
    config = preset_config(preset)
    config.vocab_size = vocab
    model = build_meta_model(config, "sdpa", "float32")
    reference = meta_reference(model)
    runtime = Runtime()
    engine = build_engine(
        model,
        strategy,
        runtime,
        lambda m: make_optimizer(m, TrainConfig()),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
        1.0,
        precision or "fp32",
        fill=lambda m: materialize(m, reference, seed=0, device=runtime.device),
    )
    return engine, precision or "fp32"


def profile(variant: str, args: argparse.Namespace) -> None:
    engine, _ = engine_for(variant, args.preset, args.vocab)
    batch = random_batch(args.vocab, args.micro, args.seq, 0)
    tokens = args.micro * args.seq

    def step() -> float:
        start = time.perf_counter()
        engine.forward_backward([batch], tokens)
        engine.step(1.0)
        return time.perf_counter() - start

    for _ in range(2):
        step()
    times = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            times.append(step())
    median = statistics.median(times)
    print(f"\n## {variant}: {median:.3f} s/step (profiled), {tokens / median:,.0f} tokens/s")
    print(
        prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=48
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--variants", default="plain,kernels,compile,kernels:bf16")
    p.add_argument("--rows", type=int, default=15)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for variant in args.variants.split(","):
        profile(variant, args)


if __name__ == "__main__":
    main()
