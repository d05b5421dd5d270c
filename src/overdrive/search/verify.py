"""`overdrive verify`: the numerics guarantee. Train with a strategy and with the plain reference, compare.

Both runs are `overdrive train` itself in subprocesses, so data order, initial weights (overdrive initialises
every module from (seed, module name), whatever the layout) and the loss contract are exactly train's. The
reference is one process, fp32, HF eager attention, no kernels, no compile, no recompute. Both log every step;
the per-step loss and pre-clip gradient norm must agree within the stated tolerance:

* fp32 runs: 1e-5 relative per step on loss and on grad norm (ranks and fused kernels only reorder sums).
* reduced precision (bf16/fp16 autocast, bf16 weights, bf16 parameters or reductions in the strategy): 2e-2
  absolute on loss per step; grad norm 2e-2 relative on the median step and 0.25 relative on every step.
  bf16 keeps 8 significant bits (a relative rounding step of 2**-8 = 3.9e-3 per value). On most steps the
  norm's millions of rounded squares average out (plain HF bf16 autocast: median 2e-3 off fp32 over 20 tiny
  steps), but on a step whose gradient is dominated by a few large entries rounding alone moves it a lot
  (the same plain HF run: 0.10 on one step of 20). So a per-step bound tight enough to catch a bug would fail
  HF itself; the median catches what moves every step (a gradient wrong by a factor of 1.02 or more, a
  missing reduction), the per-step cap catches gross failures. A norm has no natural absolute scale (it
  ranges from 0.1 to 100 between models), hence relative.

Exit 0 when every step is within tolerance, 1 when one is not; bad input and failed runs exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from overdrive.errors import UsageError

FP32_RTOL = 1e-5
LOW_LOSS_ATOL = 2e-2
LOW_GRAD_NORM_RTOL = 0.25  # any one step (bf16 rounding alone moved one step of 20 by 0.10)
LOW_GRAD_NORM_MEDIAN_RTOL = 2e-2  # the median step (bf16 rounding alone: 2e-3)
# the reference: what HF eager PyTorch does in one process
REFERENCE = {
    "strategy": "single",
    "kernels": False,
    "compile": False,
    "activation_checkpointing": False,
    "attn_implementation": "eager",
    "precision": "fp32",
    "dtype": "float32",
}
FAULT_ENV = "OVERDRIVE_FAULT_KERNEL"  # overdrive.kernels.rms_norm's test hook
OWN_ENTRIES = ("reference", "strategy", "reference.yaml", "strategy.yaml", "reference.log", "strategy.log")


@dataclass(frozen=True)
class Tolerance:
    """Per-step bounds, and optionally one on the median step's grad-norm difference (reduced precision);
    `relative` compares |strategy - reference| / |reference|."""

    loss: float
    loss_relative: bool
    grad_norm: float
    grad_norm_relative: bool = True
    grad_norm_median: float | None = None

    def describe(self) -> str:
        def one(value: float, relative: bool) -> str:
            return f"{value:g} {'relative' if relative else 'absolute'}"

        text = f"loss {one(self.loss, self.loss_relative)}, grad norm {one(self.grad_norm, self.grad_norm_relative)}"
        if self.grad_norm_median is not None:
            text += f" per step and {one(self.grad_norm_median, self.grad_norm_relative)} on the median step"
        return text


@dataclass
class StepDiff:
    step: int
    ref_loss: float | None
    loss: float | None
    loss_diff: float
    ref_grad_norm: float | None
    grad_norm: float | None
    grad_norm_diff: float
    ok: bool


def add_verify_parser(sub: Any) -> None:
    """`overdrive verify --strategy S [train flags] --steps N`: train's flags, parsed by train's machinery."""
    from overdrive.cli import add_train_arguments

    p = sub.add_parser(
        "verify", help="check a strategy's per-step loss and grad norm against the plain fp32 reference"
    )
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    add_train_arguments(p)  # --strategy, --output-dir, --overwrite and every model/data flag
    p.add_argument("--steps", type=int, default=20, help="optimizer steps compared (default 20)")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="ranks for the strategy run (default: the fewest its degrees need, 2 for data parallel)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="one bound replacing the stated ones (fp32: 1e-5 relative; bf16: 2e-2 absolute on loss)",
    )


def run_verify(args: argparse.Namespace) -> int:
    """Check the input, run both trainings, compare, print, write verify.json; 0 pass, 1 fail, 2 bad input."""
    check_verify_args(args)
    cfg = resolve_config(args)
    strategy = load_strategy(cfg.strategy)
    nproc = ranks_for(cfg.strategy, strategy, args.nproc_per_node)
    global_batch = check_layout(cfg, strategy, nproc)
    out = prepare_output_dir(args.output_dir, bool(args.overwrite))
    runs = child_configs(cfg, args.steps, global_batch, out)
    launch = nproc > 1 or (strategy is not None and strategy.is_distributed)
    commands = {
        "strategy": train_command(out / "strategy.yaml", nproc if launch else 0),
        "reference": train_command(out / "reference.yaml", 0),
    }
    envs = {"strategy": child_env(nproc), "reference": child_env(1)}
    envs["reference"].pop(FAULT_ENV, None)  # the reference is the trusted side, whatever the test hooks say
    print(
        f"overdrive verify: {cfg.strategy} on {nproc} rank{'s' if nproc > 1 else ''} vs the reference "
        f"(one process, fp32, eager attention, no kernels), {args.steps} steps -> {out}",
        flush=True,
    )
    for name in ("strategy", "reference"):
        run_child(name, commands[name], out, envs[name])
    tol = tolerance_for(runs["strategy"], strategy, out / "strategy", args.tolerance)
    diffs = compare(read_curve(out / "reference"), read_curve(out / "strategy"), args.steps, tol)
    verdict = verdict_line(diffs, tol)
    from overdrive.search.verify_report import print_table, write_report

    print_table(diffs, tol)
    print(verdict)
    write_report(out, cfg.strategy, nproc, args.steps, tol, diffs, verdict, commands)
    return 0 if passed(diffs, tol) else 1


# ---------------------------------------------------------------------------------------------- input


def check_verify_args(args: argparse.Namespace) -> None:
    """verify's own flags, and the train flags that contradict what verify does."""
    if args.steps < 1:
        raise UsageError(f"--steps must be a positive whole number, got {args.steps}")
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise UsageError(f"--nproc-per-node must be a positive whole number, got {args.nproc_per_node}")
    if args.tolerance is not None and not (math.isfinite(args.tolerance) and args.tolerance > 0):
        raise UsageError(f"--tolerance must be a positive finite number, got {args.tolerance:g}")
    if args.print_config:
        raise UsageError(
            "--print-config applies to overdrive train; drop it (verify.json records both configs)"
        )
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        raise UsageError(
            "run overdrive verify as one process, not under torchrun; it launches torchrun itself"
        )


def resolve_config(args: argparse.Namespace) -> Any:
    """Train's own resolution (YAML, flags, run_clm aliases, every check), so bad train flags fail now."""
    from overdrive.config import build_config, load_yaml
    from overdrive.hf_flags import flag_overrides

    overrides = flag_overrides(vars(args))
    if overrides.get("max_steps") is not None:
        raise UsageError("overdrive verify counts steps with --steps N; drop --max-steps")
    cfg = build_config(load_yaml(args.config) if args.config else {}, overrides)
    if cfg.resume is not None:
        raise UsageError("overdrive verify starts both runs from the same initial weights; drop --resume")
    if cfg.strategy is None:
        raise UsageError("overdrive verify needs --strategy NAME (a preset or YAML file) to compare")
    return cfg


def load_strategy(name: str) -> Any:
    """The Strategy for a preset or YAML file; None for a name train resolves itself at run time (auto)."""
    from overdrive.parallel.strategy import Strategy

    if name == "auto":
        return None
    return Strategy.from_name_or_path(name)


def min_ranks(strategy: Any) -> int:
    """The fewest ranks on which each of the strategy's axes does something.

    Fixed tensor/pipeline degrees multiply; data parallelism needs 2 replicas (hsdp: 2 shard groups); an "all
    ranks" degree (-1) takes every rank the other axes leave, so it needs 2 of its own.
    """
    if strategy is None:
        return 1  # auto: train picks for the world it is given; pass --nproc-per-node for more
    if not strategy.is_distributed:
        return 1
    fixed = max(strategy.tensor_parallel, 1) * max(strategy.pipeline_parallel, 1)
    if -1 in (strategy.tensor_parallel, strategy.pipeline_parallel):
        return 2 * fixed
    dp = 1
    if strategy.data_parallel == "hsdp":
        dp = 2 * (strategy.shard_size or 1)
    elif strategy.data_parallel != "none":
        dp = 2
    return max(2, fixed * dp)


def ranks_for(name: str, strategy: Any, requested: int | None) -> int:
    """--nproc-per-node, else the strategy's minimum; a one-process strategy runs on one process."""
    if strategy is not None and not strategy.is_distributed:
        if requested not in (None, 1):
            raise UsageError(
                f"strategy {name} runs in one process; drop --nproc-per-node or pick a distributed strategy"
            )
        return 1
    return requested if requested is not None else min_ranks(strategy)


def check_layout(cfg: Any, strategy: Any, nproc: int) -> int:
    """The global batch both runs train on, checked against the strategy's degrees on `nproc` ranks.

    run_clm's --gradient-accumulation-steps means micro × ranks × accumulation rows; verify fixes that number
    for both runs (the reference has one rank) so they see the same rows.
    """
    global_batch = cfg.global_batch_size
    if cfg.gradient_accumulation_steps is not None:
        global_batch = cfg.micro_batch_size * nproc * cfg.gradient_accumulation_steps
    if strategy is not None:
        strategy.validate(nproc)
        strategy.resolved_for(nproc).resolve_batch(
            global_batch, strategy.dp_degree(nproc), cfg.micro_batch_size
        )
    return global_batch


def prepare_output_dir(given: str | None, overwrite: bool) -> Path:
    """A new temporary directory, or the given one (non-empty only with --overwrite: its runs are replaced)."""
    if given is None:
        return Path(tempfile.mkdtemp(prefix="overdrive-verify-"))
    out = Path(given)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out} is a file; pass a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--output-dir {out} is not empty; pass --overwrite or another directory")
    out.mkdir(parents=True, exist_ok=True)
    for entry in (*OWN_ENTRIES, "verify.json"):
        path = out / entry
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return out


# ---------------------------------------------------------------------------------------------- runs


def child_configs(cfg: Any, steps: int, global_batch: int, out: Path) -> dict[str, Any]:
    """The strategy run's config (the user's, logging every step) and the reference's (plain on top)."""
    common = {
        "max_steps": steps,
        "logging_steps": 1,
        "deterministic": True,
        "max_new_tokens": 0,
        "export": False,
        "quiet": True,
        "overwrite": True,
        "resume": None,
        "save_steps": None,
        "eval_steps": None,
        "max_eval_batches": 1,  # the evaluations at start and end only cost time; one batch keeps them cheap
        "report_to": None,
        "gradient_accumulation_steps": None,
        "global_batch_size": global_batch,
    }
    runs = {
        "strategy": dataclasses.replace(cfg, **common, output_dir=str(out / "strategy")),
        "reference": dataclasses.replace(cfg, **common, **REFERENCE, output_dir=str(out / "reference")),
    }
    import yaml

    from overdrive.atomic import write_text

    for name, run in runs.items():
        write_text(out / f"{name}.yaml", yaml.safe_dump(run.to_dict(), sort_keys=False))
    return runs


def train_command(config: Path, nproc: int) -> list[str]:
    """`overdrive train --config FILE`, under torchrun when the strategy needs a process group."""
    launcher: list[str] = []
    if nproc:
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return [sys.executable, *launcher, "-m", "overdrive", "train", "--config", str(config)]


def child_env(nproc: int) -> dict[str, str]:
    """Several CPU ranks on a few cores: one thread each, or they fight over the cores."""
    env = dict(os.environ)
    if nproc > 1:
        import torch

        if not torch.cuda.is_available():
            env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_child(name: str, command: list[str], out: Path, env: dict[str, str]) -> None:
    """Run one training to completion; a failure ends verify with the log's path (exit 2)."""
    log = out / f"{name}.log"
    with open(log, "w") as fh:
        proc = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        last = last_error_line(log)
        raise UsageError(
            f"the {name} run failed (exit {proc.returncode}{': ' + last if last else ''}); see {log}"
        )


def last_error_line(log: Path) -> str:
    """The child's own `overdrive: error:` line, when it printed one."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if "overdrive: error: " in line]
    return lines[-1].split("overdrive: error: ", 1)[1].strip() if lines else ""


# ---------------------------------------------------------------------------------------------- compare


def tolerance_for(cfg: Any, strategy: Any, run_dir: Path, override: float | None) -> Tolerance:
    """fp32: 1e-5 relative on both; reduced precision: 2e-2 absolute loss, grad norm 0.25 relative per step
    and 2e-2 on the median step. `--tolerance` replaces them all with one per-step bound."""
    low = reduced_precision(cfg, strategy, run_dir)
    if low:
        tol = Tolerance(LOW_LOSS_ATOL, False, LOW_GRAD_NORM_RTOL, grad_norm_median=LOW_GRAD_NORM_MEDIAN_RTOL)
    else:
        tol = Tolerance(FP32_RTOL, True, FP32_RTOL)
    if override is not None:
        tol = dataclasses.replace(tol, loss=override, grad_norm=override, grad_norm_median=None)
    return tol


def reduced_precision(cfg: Any, strategy: Any, run_dir: Path) -> bool:
    """Whether the strategy run computed in bf16/fp16 anywhere (its config.yaml says what train resolved)."""
    import yaml

    precision, dtype = cfg.precision, cfg.dtype
    written = run_dir / "config.yaml"
    if written.is_file():
        resolved = yaml.safe_load(written.read_text()) or {}
        precision, dtype = resolved.get("precision", precision), resolved.get("dtype", dtype)
    low = precision in ("bf16", "fp16") or dtype in ("bfloat16", "float16")
    if strategy is not None:
        low = low or "bf16" in (strategy.param_dtype, strategy.reduce_dtype)
    return low


def read_curve(run_dir: Path) -> dict[int, dict[str, float]]:
    """{step: {loss, grad_norm}} of a run's training records (evaluation lines have no loss)."""
    from overdrive.metrics import read_metrics

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UsageError(f"{path} is missing: the run wrote no metrics; see {run_dir}.log")
    return {int(r["step"]): r for r in read_metrics(path) if "loss" in r}


def difference(ref: float | None, got: float | None, relative: bool) -> float:
    """|got - ref| (over |ref| when relative); inf when either is missing or not finite."""
    if ref is None or got is None or not (math.isfinite(ref) and math.isfinite(got)):
        return math.inf
    diff = abs(got - ref)
    if not relative:
        return diff
    return diff / abs(ref) if ref else (0.0 if diff == 0 else math.inf)


def compare(
    reference: dict[int, dict[str, float]], run: dict[int, dict[str, float]], steps: int, tol: Tolerance
) -> list[StepDiff]:
    diffs = []
    for step in range(1, steps + 1):
        r, s = reference.get(step, {}), run.get(step, {})
        loss_diff = difference(r.get("loss"), s.get("loss"), tol.loss_relative)
        gn_diff = difference(r.get("grad_norm"), s.get("grad_norm"), tol.grad_norm_relative)
        ok = loss_diff <= tol.loss and gn_diff <= tol.grad_norm
        diffs.append(
            StepDiff(
                step,
                r.get("loss"),
                s.get("loss"),
                loss_diff,
                r.get("grad_norm"),
                s.get("grad_norm"),
                gn_diff,
                ok,
            )
        )
    return diffs


def median_grad_norm_diff(diffs: list[StepDiff]) -> float:
    import statistics

    return statistics.median(d.grad_norm_diff for d in diffs)


def median_ok(diffs: list[StepDiff], tol: Tolerance) -> bool:
    return tol.grad_norm_median is None or median_grad_norm_diff(diffs) <= tol.grad_norm_median


def passed(diffs: list[StepDiff], tol: Tolerance) -> bool:
    return all(d.ok for d in diffs) and median_ok(diffs, tol)


def verdict_line(diffs: list[StepDiff], tol: Tolerance) -> str:
    max_loss = max(d.loss_diff for d in diffs)
    max_gn = max(d.grad_norm_diff for d in diffs)
    maxima = f"max loss diff {max_loss:.2e}, max grad-norm diff {max_gn:.2e}"
    if tol.grad_norm_median is not None:
        maxima += f", median grad-norm diff {median_grad_norm_diff(diffs):.2e}"
    maxima += f" (tolerance: {tol.describe()})"
    bad = [d for d in diffs if not d.ok]
    if not bad and median_ok(diffs, tol):
        return f"PASS: all {len(diffs)} steps within tolerance; {maxima}"
    if not bad:
        return f"FAIL: the median step's grad norm is off by more than {tol.grad_norm_median:g}; {maxima}"
    first = bad[0]
    what = []
    if first.loss_diff > tol.loss:
        what.append(f"loss diff {first.loss_diff:.2e}")
    if first.grad_norm_diff > tol.grad_norm:
        what.append(f"grad-norm diff {first.grad_norm_diff:.2e}")
    return (
        f"FAIL: first failing step {first.step} ({', '.join(what)}); {len(bad)} of {len(diffs)} steps out of "
        f"tolerance; {maxima}"
    )
