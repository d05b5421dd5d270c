"""The `overdrive tune` subcommand: train's flags plus a budget, input checks, the search, verify, outputs."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from overdrive.errors import OverdriveError, UsageError
from overdrive.search.tune import OWN_ENTRIES

VERIFY_STEPS = 5
VERIFY_ATTEMPTS = 3  # the fastest trials verified in turn until one passes
AXIS_NAMES = {
    "precision": "precision",
    "kernels": "kernels",
    "compile": "compile",
    "micro": "micro",
    "micro_batch_size": "micro",
    "recompute": "recompute",
    "activation_checkpointing": "recompute",
    "dp": "dp",
    "data_parallel": "dp",
}
TRUE, FALSE = ("true", "on", "yes", "1"), ("false", "off", "no", "0")


class TuneFailed(OverdriveError):
    """No trial could be measured, or none of the fastest passed verify: exit 1, the report is written."""


def add_tune_parser(sub: Any) -> None:
    """`overdrive tune [train's model/data/batch flags] --trials N ...`, parsed by train's own machinery."""
    from overdrive.cli import add_train_arguments

    p = sub.add_parser(
        "tune",
        help="measure short runs of candidate strategies and pick the fastest (optuna)",
        conflict_handler="resolve",  # --seed is the sampler's here
    )
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    add_train_arguments(p)
    p.add_argument("--trials", type=int, default=12, help="measured runs at most (default 12)")
    p.add_argument(
        "--confirm",
        type=int,
        default=3,
        help="of those runs, spend N re-measuring the leading points in turn before choosing (default 3: "
        "leader, runner-up, leader; at most a quarter of --trials; 0: off)",
    )
    p.add_argument("--time-budget", type=float, default=None, help="seconds; no new trial starts after it")
    p.add_argument("--nproc-per-node", type=int, default=1, help="ranks each trial runs on (default 1)")
    p.add_argument(
        "--seed",
        dest="sampler_seed",
        type=int,
        default=0,
        help="optuna sampler seed (default 0; the training seed comes from --config, else 42)",
    )
    p.add_argument(
        "--trial-steps", type=int, default=4, help="timed steps per trial after warm-up (default 4)"
    )
    p.add_argument("--trial-timeout", type=float, default=600.0, help="seconds per trial (default 600)")
    p.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="AXIS=V1,V2",
        help="restrict an axis (precision, kernels, compile, micro, recompute, dp); repeatable",
    )
    p.add_argument("--no-verify", action="store_true", help="skip `overdrive verify` of the winner")


def check_tune_args(args: argparse.Namespace) -> None:
    for name in ("trials", "nproc_per_node", "trial_steps"):
        if getattr(args, name) < 1:
            raise UsageError(
                f"--{name.replace('_', '-')} must be a positive whole number, got {getattr(args, name)}"
            )
    if args.confirm < 0:
        raise UsageError(f"--confirm must be 0 (off) or a positive number of runs, got {args.confirm}")
    for name in ("time_budget", "trial_timeout"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UsageError(
                f"--{name.replace('_', '-')} must be a positive number of seconds, got {value:g}"
            )
    if args.print_config:
        raise UsageError("--print-config applies to overdrive train; drop it (tune.json records the configs)")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        raise UsageError(
            "run overdrive tune as one process, not under torchrun; it launches each trial itself"
        )


def resolve_config(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Train's resolution of the flags (every check train makes) and the axis values the user pinned."""
    from overdrive.config import build_config, load_yaml
    from overdrive.hf_flags import flag_overrides

    overrides = flag_overrides(vars(args))
    yaml_values = load_yaml(args.config) if args.config else {}
    for name, flag in (("max_steps", "--trial-steps"), ("num_train_epochs", "--trial-steps")):
        if overrides.get(name) is not None:
            raise UsageError(
                f"overdrive tune runs short trials; drop --{name.replace('_', '-')} (see {flag})"
            )
    cfg = build_config(yaml_values, overrides)
    if cfg.resume is not None:
        raise UsageError("overdrive tune measures fresh runs; drop --resume")
    given = {**yaml_values, **{k: v for k, v in overrides.items() if v is not None and not _implied(v)}}
    return cfg, given


def _implied(value: Any) -> bool:
    from overdrive.config import Implied

    return isinstance(value, Implied)


def pins(given: dict[str, Any], cfg: Any) -> dict[str, set[Any]]:
    """Axes an explicit flag (or --config key) fixes; --strategy fixes the data-parallel kind."""
    out: dict[str, set[Any]] = {}
    given = {k: v for k, v in given.items() if v != "auto"}  # auto leaves the axis to the search
    if "precision" in given:
        out["precision"] = {cfg.precision}
    if "micro_batch_size" in given or cfg.gradient_accumulation_steps is not None:
        out["micro"] = {cfg.micro_batch_size}
    for name in ("kernels", "compile"):
        if given.get(name) is not None:
            out[name] = {bool(given[name])}
    if given.get("activation_checkpointing") is not None:
        out["recompute"] = {"full", "selective"} if given["activation_checkpointing"] else {"none"}
    if given.get("strategy"):
        out["dp"] = {strategy_dp(given["strategy"])}
    return out


def strategy_dp(name: str) -> str:
    """The dp axis value of --strategy; strategies with axes tune does not vary are refused."""
    from overdrive.parallel.strategy import Strategy

    s = Strategy.from_name_or_path(name)
    if s.tensor_parallel != 1 or s.pipeline_parallel != 1 or s.offload != "none" or s.data_parallel == "hsdp":
        raise UsageError(
            f"overdrive tune varies data parallelism without tensor/pipeline parallelism, offload or hsdp; "
            f"--strategy {name} has them; drop --strategy or pass single, ddp, fsdp, zero2 or deepspeed-zero1|2|3"
        )
    if s.engine == "deepspeed":
        return f"deepspeed-zero-{s.resolved_zero_stage}"
    if s.data_parallel == "fsdp":
        return "fsdp-zero-3" if s.resolved_reshard_after_forward else "fsdp-zero-2"
    return "single" if s.data_parallel == "none" else s.data_parallel


def parse_space(items: list[str]) -> dict[str, set[Any]]:
    """--space AXIS=V1,V2 ... -> {axis: values}."""
    out: dict[str, set[Any]] = {}
    for item in items:
        axis, sep, values = item.partition("=")
        key = AXIS_NAMES.get(axis.strip().replace("-", "_"))
        if not sep or key is None or not values.strip():
            raise UsageError(
                f"--space {item!r}: use AXIS=V1,V2 with AXIS one of precision, kernels, compile, micro, "
                "recompute, dp"
            )
        out[key] = {_space_value(key, v.strip(), item) for v in values.split(",") if v.strip()}
    return out


def _space_value(axis: str, text: str, item: str) -> Any:
    if axis in ("kernels", "compile"):
        if text.lower() in TRUE + FALSE:
            return text.lower() in TRUE
        raise UsageError(f"--space {item!r}: {axis} takes true or false, got {text!r}")
    if axis == "micro":
        if not text.isdigit() or int(text) < 1:
            raise UsageError(f"--space {item!r}: micro takes positive whole numbers, got {text!r}")
        return int(text)
    return text


def merge_restrictions(pinned: dict[str, set[Any]], space: dict[str, set[Any]]) -> dict[str, set[Any]]:
    out = dict(pinned)
    for axis, values in space.items():
        out[axis] = out[axis] & values if axis in out else values
    return out


def prepare_output_dir(given: str | None, overwrite: bool) -> Path:
    """--output-dir (non-empty only with --overwrite: tune's own entries are replaced), else runs/tune-<time>."""
    out = Path(given) if given else Path("runs") / time.strftime("tune-%Y%m%d-%H%M%S")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out} is a file; pass a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--output-dir {out} is not empty; pass --overwrite or another directory")
    out.mkdir(parents=True, exist_ok=True)
    for entry in OWN_ENTRIES:
        path = out / entry
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return out


def global_batch(cfg: Any, nproc: int) -> int:
    """run_clm's --gradient-accumulation-steps means micro × ranks × accumulation rows (as verify reads it)."""
    if cfg.gradient_accumulation_steps is not None:
        return cfg.micro_batch_size * nproc * cfg.gradient_accumulation_steps
    return cfg.global_batch_size


def run_tune(args: argparse.Namespace) -> int:
    """Check everything, plan, search, verify the winner, write the outputs and the cache; 0 on success."""
    from overdrive.search import cache
    from overdrive.search.hardware import resolve
    from overdrive.search.plan import plan
    from overdrive.search.tune import build_space, confirm_count, point_rate, search
    from overdrive.search.tune_report import write_outputs

    check_tune_args(args)
    cfg, given = resolve_config(args)
    world = args.nproc_per_node
    gb = global_batch(cfg, world)
    cfg = dataclasses.replace(cfg, global_batch_size=gb, gradient_accumulation_steps=None)
    restrict = merge_restrictions(pins(given, cfg), parse_space(args.space))
    device = resolve(None)
    shape = cache.model_shape(cfg)
    ranked = plan(shape, cfg.block_size, gb, device, 1, world)
    space = build_space(ranked, restrict, world, None if device.cuda else device.memory_bytes)
    out = prepare_output_dir(args.output_dir, bool(cfg.overwrite))
    print(
        f"overdrive tune: {len(space.feasible_points())} of {len(space.order)} points fit (plan), up to "
        f"{args.trials} trials on {world} × {device.name} -> {out}",
        flush=True,
    )
    start = time.perf_counter()
    history = search(
        space,
        cfg,
        out,
        args.trials,
        args.sampler_seed,
        world,
        args.time_budget,
        args.trial_steps,
        args.trial_timeout,
        report=lambda line: print(line, flush=True),
        confirm=confirm_count(args.trials, args.confirm),
    )
    winner, checks = choose_winner(history, cfg, out, world, not args.no_verify)
    key = cache.key_for_config(cfg, world, device.name)
    meta = {
        "model": cfg.model or cfg.model_config or "tiny",
        "seq": cfg.block_size,
        "global_batch_size": gb,
        "world": world,
        "device": device.name,
        "sampler_seed": args.sampler_seed,
        "trials_requested": args.trials,
        "space_points": len(space.order),
        "feasible_points": len(space.feasible_points()),
        "elapsed_sec": time.perf_counter() - start,
        "cache_key": key,
        "model_shape": cache.shape_dict(cfg),
        "verify": checks,
    }
    result = write_outputs(out, history, winner, meta)
    if winner is None:
        raise TuneFailed(failure_line(history, checks, out))
    path = cache.store_tuned(key, result)
    print(
        f"best: {winner.point.describe()}, {point_rate(history, winner.point):,.0f} tok/s -> {out / 'best.yaml'} "
        f"(cached {path})"
    )
    return 0


def failure_line(history: list[Any], checks: list[dict[str, Any]], out: Path) -> str:
    if not any(t.result.ok for t in history):
        return f"no trial finished ({', '.join(sorted({t.result.status for t in history})) or 'none ran'}); see {out / 'tune.md'}"
    return f"none of the {len(checks)} fastest strategies passed overdrive verify; see {out / 'tune.md'}"


def choose_winner(
    history: list[Any], cfg: Any, out: Path, world: int, verify: bool
) -> tuple[Any, list[dict[str, Any]]]:
    """The fastest measured trial that passes `overdrive verify` (each check recorded), or None."""
    from overdrive.search.tune import best_trials

    ranked = best_trials(history)
    if not verify:
        return (ranked[0] if ranked else None), []
    checks = []
    for trial in ranked[:VERIFY_ATTEMPTS]:
        check = verify_trial(trial, cfg, out, world)
        checks.append(check)
        print(f"verify trial {trial.number + 1} ({trial.point.describe()}): {check['verdict']}", flush=True)
        if check["verdict"] == "pass":
            return trial, checks
    return None, checks


def verify_trial(trial: Any, cfg: Any, out: Path, world: int) -> dict[str, Any]:
    """`overdrive verify` of one trial's strategy and precision against the fp32 reference, in a subprocess."""
    import yaml

    from overdrive.atomic import write_text

    base = Path(trial.result.run_dir)
    run_cfg = yaml.safe_load(
        (base / "config.yaml").read_text()
    )  # the trial's own config: same data, tokenizer
    run_cfg.update(max_steps=None, output_dir=None, overwrite=False)
    config = out / "verify" / f"{trial.number:03d}.yaml"
    write_text(config, yaml.safe_dump(run_cfg, sort_keys=False))
    command = [
        sys.executable,
        "-m",
        "overdrive",
        "verify",
        "--config",
        str(config),
        "--steps",
        str(VERIFY_STEPS),
        "--output-dir",
        str(out / "verify" / f"{trial.number:03d}"),
    ]
    if world > 1:
        command += ["--nproc-per-node", str(world)]
    log = out / "verify" / f"{trial.number:03d}.log"
    with open(log, "w") as fh:
        proc = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, check=False)
    verdict = {0: "pass", 1: "fail"}.get(proc.returncode, "error")
    lines = [
        ln
        for ln in log.read_text(errors="replace").splitlines()
        if ln.startswith(("PASS", "FAIL", "overdrive: error"))
    ]
    return {
        "trial": trial.number,
        "verdict": verdict,
        "line": lines[-1] if lines else f"exit {proc.returncode}",
        "command": " ".join(command),
        "log": str(log),
    }
