"""`overdrive verify`: the numerics guarantee. Train with a strategy and with the plain reference, compare.

Both runs are `overdrive train` itself in subprocesses, so data order, initial weights (overdrive initialises
every module from (seed, module name), whatever the layout) and the loss contract are exactly train's. The
reference is one process, fp32, HF eager attention, no kernels, no compile, no recompute. Both log every step;
the per-step loss and pre-clip gradient norm must agree within the stated tolerance:

* fp32 runs: 1e-5 relative per step on loss and on grad norm (ranks and fused kernels only reorder sums).
* reduced precision (bf16/fp16 autocast, bf16 weights, bf16 parameters or reductions in the strategy): 2e-2
  absolute on loss and 5e-2 relative on grad norm. bf16 keeps 8 significant bits (a relative rounding step of
  2**-8 = 3.9e-3 per value); the norm sums millions of such rounded squares, so the noise mostly averages out,
  but the weights drift apart a little more every step. 5% is about ten rounding steps: it passes the drift
  of 20 bf16 steps with margin and still fails a gradient that is wrong by a constant factor of 1.05 or more.
  A norm has no natural absolute scale (it ranges from 0.1 to 100 between models), hence relative.

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
LOW_GRAD_NORM_RTOL = 5e-2
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
    """Per-step bounds; `relative` compares |strategy - reference| / |reference|."""

    loss: float
    loss_relative: bool
    grad_norm: float
    grad_norm_relative: bool = True

    def describe(self) -> str:
        def one(value: float, relative: bool) -> str:
            return f"{value:g} {'relative' if relative else 'absolute'}"

        return f"loss {one(self.loss, self.loss_relative)}, grad norm {one(self.grad_norm, self.grad_norm_relative)}"


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
        help="per-step bound replacing the stated one (fp32: 1e-5 relative; bf16: 2e-2 absolute on loss)",
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
    print_table(diffs, tol)
    print(verdict)
    write_report(out, cfg.strategy, nproc, args.steps, tol, diffs, verdict, commands)
    return 0 if all(d.ok for d in diffs) else 1


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
    """fp32: 1e-5 relative on both; reduced precision: 2e-2 absolute loss, 5e-2 relative grad norm."""
    low = reduced_precision(cfg, strategy, run_dir)
    if low:
        tol = Tolerance(LOW_LOSS_ATOL, False, LOW_GRAD_NORM_RTOL)
    else:
        tol = Tolerance(FP32_RTOL, True, FP32_RTOL)
    if override is not None:
        tol = dataclasses.replace(tol, loss=override, grad_norm=override)
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


def verdict_line(diffs: list[StepDiff], tol: Tolerance) -> str:
    max_loss = max(d.loss_diff for d in diffs)
    max_gn = max(d.grad_norm_diff for d in diffs)
    maxima = f"max loss diff {max_loss:.2e}, max grad-norm diff {max_gn:.2e} (tolerance: {tol.describe()})"
    bad = [d for d in diffs if not d.ok]
    if not bad:
        return f"PASS: all {len(diffs)} steps within tolerance; {maxima}"
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


# ---------------------------------------------------------------------------------------------- output


def fmt(value: float | None) -> str:
    return "missing" if value is None else f"{value:.6f}"


def print_table(diffs: list[StepDiff], tol: Tolerance) -> None:
    """A rich table on a terminal, plain columns otherwise (logs, pipes)."""
    loss_unit = "rel" if tol.loss_relative else "abs"
    gn_unit = "rel" if tol.grad_norm_relative else "abs"
    header = [
        "step",
        "reference loss",
        "strategy loss",
        f"loss diff ({loss_unit})",
        f"grad-norm diff ({gn_unit})",
        "",
    ]
    rows = [
        [
            str(d.step),
            fmt(d.ref_loss),
            fmt(d.loss),
            f"{d.loss_diff:.2e}",
            f"{d.grad_norm_diff:.2e}",
            "" if d.ok else "FAIL",
        ]
        for d in diffs
    ]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title_justify="left")
        for col in header:
            table.add_column(col, justify="right")
        for row in rows:
            table.add_row(*row, style=None if not row[-1] else "red")
        Console().print(table)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for row in (header, *rows):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def write_report(
    out: Path,
    strategy: str,
    nproc: int,
    steps: int,
    tol: Tolerance,
    diffs: list[StepDiff],
    verdict: str,
    commands: dict[str, list[str]],
) -> None:
    """verify.json: both curves, the differences, the tolerance, the verdict and the commands (atomic)."""
    from overdrive.atomic import write_json

    def finite(value: float) -> float | None:
        return value if math.isfinite(value) else None

    bad = [d.step for d in diffs if not d.ok]
    write_json(
        out / "verify.json",
        {
            "strategy": strategy,
            "nproc_per_node": nproc,
            "steps": steps,
            "verdict": "pass" if not bad else "fail",
            "verdict_line": verdict,
            "first_failing_step": bad[0] if bad else None,
            "tolerance": dataclasses.asdict(tol),
            "max_loss_diff": finite(max(d.loss_diff for d in diffs)),
            "max_grad_norm_diff": finite(max(d.grad_norm_diff for d in diffs)),
            "reference": {"loss": [d.ref_loss for d in diffs], "grad_norm": [d.ref_grad_norm for d in diffs]},
            "strategy_run": {"loss": [d.loss for d in diffs], "grad_norm": [d.grad_norm for d in diffs]},
            "loss_diff": [finite(d.loss_diff) for d in diffs],
            "grad_norm_diff": [finite(d.grad_norm_diff) for d in diffs],
            "commands": {name: " ".join(cmd) for name, cmd in commands.items()},
            "configs": {"strategy": str(out / "strategy.yaml"), "reference": str(out / "reference.yaml")},
            "logs": {"strategy": str(out / "strategy.log"), "reference": str(out / "reference.log")},
        },
    )
