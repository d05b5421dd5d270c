"""One tune trial: a short `overdrive train` of one strategy in its own process (group), measured.

Each trial is a real training run in a subprocess (torchrun when it needs several ranks), so an OOM, a crash or
a hang ends only that trial; nothing in the tuning process holds its memory afterwards. The run does a warm-up
(1 step, 2 with compile) and a few timed steps, logging every step; throughput is the median of the per-step
rates after warm-up (a median, because one step stalled by another process on a shared machine must not decide
a trial), peak memory the largest the run logged. A trial that did not finish is never a throughput of 0:
its status (oom, crash, timeout) marks it infeasible.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from overdrive.parallel.strategy import Strategy

STATUSES = ("ok", "oom", "crash", "timeout")
OOM_MARKERS = (
    "out of memory",
    "outofmemoryerror",
    "memoryerror",
    "can't allocate memory",
    "cannot allocate memory",
    "signal 9 (sigkill)",  # torchrun's report of a rank the kernel's OOM killer ended
    "exitcode  : -9",
)


@dataclass(frozen=True)
class TrialSpec:
    """What a trial runs: the strategy (micro batch pinned in it), the autocast precision and the ranks."""

    strategy: Strategy
    precision: str
    nproc: int = 1

    @property
    def micro(self) -> int:
        return int(self.strategy.micro_batch_size or 0)


@dataclass
class TrialResult:
    """What a trial measured; `tokens_per_sec` is set only when `status` is ok."""

    status: str
    tokens_per_sec: float | None = None
    peak_memory_bytes: int | None = None
    step_rates: list[float] = field(default_factory=list)
    seconds: float = 0.0
    returncode: int | None = None
    error: str | None = None
    run_dir: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def warmup_steps(strategy: Strategy) -> int:
    """Steps train's own meter leaves untimed: compilation happens in the first two with compile."""
    return 2 if strategy.compile else 1


def trial_config(base: Any, spec: TrialSpec, run_dir: Path, timed_steps: int) -> Any:
    """The user's TrainConfig, turned into a short measurement of `spec` writing into `run_dir`.

    No evaluation (no held-out split unless the user gave a validation file, then one batch), no export, no
    sample, no checkpoints, no trackers; every step logged. The axes are set both in the strategy file and
    as train flags, so nothing else (a YAML default, `auto`) can change what is measured.
    """
    s = spec.strategy
    return dataclasses.replace(
        base,
        strategy=str(run_dir / "strategy.yaml"),
        precision=spec.precision,
        micro_batch_size=spec.micro or base.micro_batch_size,
        gradient_accumulation_steps=None,
        kernels=bool(s.kernels),
        compile=bool(s.compile),
        activation_checkpointing=s.activation_checkpointing != "none",
        max_steps=warmup_steps(s) + timed_steps,
        logging_steps=1,
        eval_steps=None,
        max_eval_batches=1,
        validation_split_percentage=0,
        save_steps=None,
        resume=None,
        report_to=None,
        export=False,
        max_new_tokens=0,
        quiet=True,
        overwrite=True,
        output_dir=str(run_dir / "run"),
    )


def train_command(config: Path, nproc: int) -> list[str]:
    """`python -m overdrive train --config FILE`, under torchrun for more than one rank."""
    launcher: list[str] = []
    if nproc > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return [sys.executable, *launcher, "-m", "overdrive", "train", "--config", str(config)]


def trial_env(nproc: int) -> dict[str, str]:
    """Ranks sharing a CPU get one thread each (they would fight over the cores otherwise)."""
    env = dict(os.environ)
    if nproc > 1:
        import torch

        if not torch.cuda.is_available():
            env["OMP_NUM_THREADS"] = "1"
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def run_trial(
    base: Any, spec: TrialSpec, run_dir: Path, timed_steps: int = 4, timeout: float = 600
) -> TrialResult:
    """Write the trial's strategy and config into `run_dir`, run it, classify and measure it."""
    import yaml

    from overdrive.atomic import write_text

    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "strategy.yaml", spec.strategy.to_yaml())
    cfg = trial_config(base, spec, run_dir, timed_steps)
    write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    command = train_command(run_dir / "config.yaml", spec.nproc)
    return execute(command, trial_env(spec.nproc), run_dir, warmup_steps(spec.strategy), timeout)


def execute(
    command: list[str], env: dict[str, str], run_dir: Path, warmup: int, timeout: float
) -> TrialResult:
    """Run `command` in its own session (a timeout kills torchrun and every rank), log to run_dir/trial.log."""
    log = run_dir / "trial.log"
    start = time.perf_counter()
    timed_out = False
    with open(log, "w") as fh:
        proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)
    seconds = time.perf_counter() - start
    text = log.read_text(errors="replace")
    result = (
        measure(run_dir / "run", warmup) if proc.returncode == 0 and not timed_out else TrialResult("crash")
    )
    status = classify(proc.returncode, timed_out, text, result.ok)
    result.status, result.seconds, result.returncode = status, seconds, proc.returncode
    result.run_dir = str(run_dir)
    if status != "ok":
        result.tokens_per_sec = None
        result.error = (result.error if status == "crash" else None) or error_line(text, status, timeout)
    return result


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the trial's process group, SIGKILL what is left after a grace period."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def classify(returncode: int | None, timed_out: bool, log_text: str, measured: bool) -> str:
    """ok / oom / crash / timeout from how the process ended and what it printed."""
    if timed_out:
        return "timeout"
    if returncode == 0 and measured:
        return "ok"
    lowered = log_text.lower()
    if returncode == -signal.SIGKILL or any(marker in lowered for marker in OOM_MARKERS):
        return "oom"
    return "crash"


def error_line(log_text: str, status: str, timeout: float) -> str:
    """One line saying why a trial is infeasible: train's own error line, else the log's last line."""
    if status == "timeout":
        return f"no result within {timeout:g} s"
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "overdrive: error: " in line:
            return line.split("overdrive: error: ", 1)[1]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def measure(run: Path, warmup: int) -> TrialResult:
    """Median per-step tokens/s after `warmup` steps and the peak memory, from the run's metrics.jsonl."""
    from overdrive.errors import UsageError
    from overdrive.metrics import read_metrics

    path = run / "metrics.jsonl"
    if not path.is_file():
        return TrialResult("crash", error="the run wrote no metrics.jsonl")
    try:
        records = [r for r in read_metrics(path) if "loss" in r]
    except UsageError as exc:
        return TrialResult("crash", error=str(exc))
    rates = [float(r["tokens_per_sec"]) for r in records if r["step"] > warmup and r.get("tokens_per_sec")]
    peaks = [int(r["peak_memory_bytes"]) for r in records if r.get("peak_memory_bytes")]
    if not rates:
        return TrialResult(
            "crash", error="no timed step after warm-up", peak_memory_bytes=max(peaks, default=None)
        )
    return TrialResult(
        "ok",
        tokens_per_sec=statistics.median(rates),
        peak_memory_bytes=max(peaks, default=None),
        step_rates=rates,
    )
