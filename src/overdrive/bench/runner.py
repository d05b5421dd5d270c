"""Run a bench: prepare the shared inputs once, then one subprocess per (system, global batch size) cell.

Fairness is built here, not assumed: the parent trains the tokenizer, cuts the token rows and initialises the
model exactly once (with overdrive's own data functions) and every system loads those files; HF Trainer gets
the rows in the order overdrive's loader will draw them. Every cell runs the same warm-up + measured optimizer
steps and is timed the same way: wall time from the end of the last warm-up step to the end of the last step.

A cell never takes the bench down: out of memory -> "oom", past the per-cell limit -> "timeout" (its whole
process group is killed), killed by a signal -> "killed" ("oom" when the kernel's OOM killer fired meanwhile),
any other failure -> "error" with the line of stderr that names it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from overdrive.bench.hf_trainer_cell import OOM_MARKER
from overdrive.bench.inputs import Prepared, prepare
from overdrive.bench.oom_kills import oom_kill_counts, oom_killer_fired
from overdrive.bench.plan import cell_batch, cell_skip, pipeline_bubble, planned_row
from overdrive.bench.presets import SystemSpec, Workload
from overdrive.errors import UsageError

# Optimizer settings shared by every system (overdrive's defaults; passed explicitly so nobody's default drifts).
WEIGHT_DECAY, ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON = 0.1, 0.9, 0.95, 1e-8
FIRST_LOSSES = 5
# Flags the workload owns: an overdrive system may not change them, or it would train something else.
WORKLOAD_FLAGS = (
    "--precision",
    "--global-batch-size",
    "--micro-batch-size",
    "--block-size",
    "--seed",
    "--model",
    "--model-config",
    "--tokenizer",
    "--train-file",
    "--dataset",
    "--max-steps",
    "--output-dir",
    "--learning-rate",
    "--lr-scheduler",
    "--max-grad-norm",
    "--packing",
    "--dtype",
    "--gradient-accumulation-steps",
)
OOM_PATTERNS = re.compile(
    rf"{re.escape(OOM_MARKER)}|OutOfMemoryError|out of memory|can't allocate memory", re.IGNORECASE
)
RANK_PREFIX = re.compile(r"^\[(?:default)?rank\d+\]:\s?")
# summary.json key of an overdrive run -> bench row key
RUN_SUMMARY_KEYS = {
    "micro_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "accumulation_steps",
    "world_size": "world_size",
}
ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b|overdrive: error)")


# ------------------------------------------------------------------------------------------- processes
@dataclass
class ProcessOutcome:
    """How a child ended: status is ok / oom / killed / timeout / error; message says why when not ok."""

    status: str
    returncode: int | None
    wall_sec: float
    message: str = ""


def error_line(stderr: str) -> str:
    """The line that names the failure: a rank's own exception rather than torchrun's ChildFailedError summary,
    else the last non-decoration line."""
    lines = [RANK_PREFIX.sub("", ln).strip() for ln in stderr.splitlines()]
    lines = [ln for ln in lines if ln]
    exceptions = [ln for ln in lines if ERROR_LINE.match(ln)]
    own = [ln for ln in exceptions if "ChildFailedError" not in ln]
    if own or exceptions:
        return (own or exceptions)[-1][:300]
    for ln in reversed(lines):
        if set(ln) - set("=-*#~ "):
            return ln[:300]
    return ""


def classify(returncode: int | None, stderr: str, oom_killed: bool | None = None) -> tuple[str, str]:
    """(status, message) of a finished child from its exit code, its stderr, and whether the kernel's OOM
    killer fired while it ran (None: unknown, see oom_kills). A SIGKILL is "oom" only when the killer fired:
    it may as well come from a scheduler or a person."""
    if returncode == 0:
        return "ok", ""
    oom = [ln.strip() for ln in stderr.splitlines() if OOM_PATTERNS.search(ln)]
    if oom:
        marked = [ln for ln in oom if OOM_MARKER in ln]
        return "oom", (marked or oom)[-1].replace(OOM_MARKER, "").strip()[:300]
    killed = returncode in (-signal.SIGKILL, 128 + signal.SIGKILL) or re.search(
        r"exitcode\s*:\s*-9\b|Signal 9 \(SIGKILL\)", stderr
    )
    if not killed:  # killed directly, or a rank as torchrun reports it
        return "error", error_line(stderr) or f"exit code {returncode}"
    if oom_killed:
        return "oom", "killed by SIGKILL while the kernel's out-of-memory killer fired (oom_kill count rose)"
    if oom_killed is None:
        return "killed", "killed by SIGKILL (the kernel's OOM-kill counters cannot be read here)"
    return "killed", "killed by SIGKILL, not by the kernel's out-of-memory killer (oom_kill count unchanged)"


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group (torchrun and its ranks), give it 10 s, then SIGKILL what is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10.0)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # ranks that outlived their launcher
    proc.wait()


def run_process(
    argv: Sequence[str], timeout: float, log_dir: Path, env: dict[str, str] | None = None
) -> ProcessOutcome:
    """Run argv in its own session with stdout/stderr to log_dir; never raises for the child's failures."""
    log_dir.mkdir(parents=True, exist_ok=True)
    oom_kills = oom_kill_counts()
    started = time.perf_counter()
    with open(log_dir / "stdout.log", "wb") as out, open(log_dir / "stderr.log", "wb") as err:
        try:
            proc = subprocess.Popen(
                list(argv), stdout=out, stderr=err, env=env, cwd=log_dir, start_new_session=True
            )
        except OSError as exc:
            return ProcessOutcome("error", None, 0.0, f"could not start {argv[0]}: {exc}")
        try:
            returncode: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            wall = time.perf_counter() - started
            return ProcessOutcome("timeout", None, wall, f"no result within {timeout:.0f} s; killed")
        except BaseException:
            kill_group(proc)  # Ctrl-C in the parent must not leave ranks running
            raise
    wall = time.perf_counter() - started
    stderr = (log_dir / "stderr.log").read_text(errors="replace")
    status, message = classify(returncode, stderr, oom_killer_fired(oom_kills, oom_kill_counts()))
    return ProcessOutcome(status, returncode, wall, message)


def child_env(device: str, threads: int | None = None) -> dict[str, str]:
    """The cells' environment; on CPU every system gets the same explicit thread count (accelerate would
    otherwise pick its own for Trainer while torch picks for overdrive)."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("DS_ACCELERATOR", "cuda" if device == "cuda" else "cpu")
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


# ----------------------------------------------------------------------------------------------- cells
def launcher(nproc: int, kind: str) -> list[str]:
    """torchrun for several processes, and always for DeepSpeed (it wants a launched process group)."""
    if nproc > 1 or kind == "hf-deepspeed":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return [sys.executable]


def check_overdrive_args(spec: SystemSpec) -> None:
    for arg in spec.extra_args:
        if arg.split("=", 1)[0] in WORKLOAD_FLAGS:
            raise UsageError(
                f"{spec.name}: {arg.split('=', 1)[0]} is fixed by the workload for every system; "
                "set it with the bench flag instead"
            )


def deepspeed_config(w: Workload, g: int) -> dict[str, Any]:
    """The seed's ZeRO-3 config, with its optimizer taking Trainer's values and the same clipping as the rest."""
    return {
        "train_batch_size": g,
        "train_micro_batch_size_per_gpu": w.micro_for(g),
        "gradient_accumulation_steps": w.accumulation_for(g),
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        },
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": w.precision == "bf16"},
        "fp16": {"enabled": w.precision == "fp16"},
        "gradient_clipping": w.max_grad_norm,
    }


def hf_command(spec: SystemSpec, w: Workload, g: int, prep: Prepared, cell: Path) -> list[str]:
    from overdrive.atomic import write_json

    cell_spec: dict[str, Any] = {
        "system": spec.kind,
        "init_dir": str(prep.init_dir),
        "rows_dir": str(prep.rows_dir),
        "order_file": str(prep.orders[g]),
        "trainer_dir": str(cell / "trainer"),
        "result_file": str(cell / "result.json"),
        "micro_batch_size": w.micro_for(g),
        "accumulation_steps": w.accumulation_for(g),
        "steps": w.steps,
        "warmup_steps": w.warmup_steps,
        "precision": w.precision,
        "learning_rate": w.learning_rate,
        "weight_decay": WEIGHT_DECAY,
        "adam_beta1": ADAM_BETA1,
        "adam_beta2": ADAM_BETA2,
        "adam_epsilon": ADAM_EPSILON,
        "max_grad_norm": w.max_grad_norm,
        "seed": w.seed,
        "attn_implementation": w.attn_implementation,
    }
    if spec.kind == "hf-deepspeed":
        write_json(cell / "ds_config.json", deepspeed_config(w, g))
        cell_spec["deepspeed_config"] = str(cell / "ds_config.json")
    write_json(cell / "spec.json", cell_spec)
    return [*launcher(w.nproc, spec.kind), "-m", "overdrive.bench.hf_trainer_cell", str(cell / "spec.json")]


def overdrive_command(spec: SystemSpec, w: Workload, g: int, prep: Prepared, cell: Path) -> list[str]:
    data: list[str] = []
    if w.dataset:
        data += ["--dataset", w.dataset] + (
            ["--dataset-config", w.dataset_config] if w.dataset_config else []
        )
    else:
        data += ["--train-file", str(prep.train_file)]
    if w.text_column:
        data += ["--text-column", w.text_column]
    flags = {
        "--model": str(prep.init_dir),
        "--validation-split-percentage": "0",
        "--max-eval-batches": "1",
        "--block-size": str(w.seq_len),
        "--packing": "concat",
        "--max-steps": str(w.warmup_steps + w.steps),
        "--global-batch-size": str(g),
        "--micro-batch-size": str(cell_batch(w, spec, g)[0]),
        "--learning-rate": repr(w.learning_rate),
        "--lr-scheduler": "constant",
        "--warmup-steps": "0",
        "--weight-decay": repr(WEIGHT_DECAY),
        "--adam-beta1": repr(ADAM_BETA1),
        "--adam-beta2": repr(ADAM_BETA2),
        "--adam-epsilon": repr(ADAM_EPSILON),
        "--max-grad-norm": repr(w.max_grad_norm),
        "--precision": w.precision,
        "--dtype": "float32",
        "--attn-implementation": w.attn_implementation,
        "--seed": str(w.seed),
        "--logging-steps": "1",
        "--output-dir": str(cell / "run"),
        "--max-new-tokens": "0",
    }
    args = [*(x for kv in flags.items() for x in kv), *data, "--overwrite", "--quiet", "--no-export"]
    nproc = spec.nproc or w.nproc
    return [*launcher(nproc, spec.kind), "-m", "overdrive", "train", *args, *spec.extra_args]


def read_overdrive_run(run_dir: Path) -> dict[str, Any] | None:
    """Per-step losses, end-of-step times and peak memory from the run's metrics.jsonl (logged every step)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    if not train:
        return None
    out: dict[str, Any] = {
        "losses": [r["loss"] for r in train],
        "step_end_sec": [r["elapsed_sec"] for r in train],
        "peak_memory_bytes": train[-1].get("peak_memory_bytes"),
    }
    summary = run_dir / "summary.json"
    if summary.is_file():  # what the run itself resolved: the table shows what ran, not what was planned
        done = json.loads(summary.read_text())
        for key, ours in RUN_SUMMARY_KEYS.items():
            if done.get(key) is not None:
                out[ours] = done[key]
        choice = done.get("strategy_choice") or {}
        if choice:  # what --strategy/--precision auto chose, and why
            out["precision"] = choice.get("precision")
            out["strategy_choice"] = {k: choice.get(k) for k in ("source", "describe", "precision", "reason")}
    return out


HF_PRECISIONS = ("fp32", "bf16")


def best_precision(
    spec: SystemSpec,
    w: Workload,
    g: int,
    prep: Prepared,
    cells_dir: Path,
    peak_tflops: float | None,
    repeat: int,
) -> dict[str, Any]:
    """Precision auto for an HF system: the cell runs at fp32 and at bf16 (each in its own process) and the
    faster one stands for it, as a user would pick; both outcomes stay in `precision_runs`."""
    from dataclasses import replace

    from overdrive.bench.report import ok

    rows = {
        p: run_cell(spec, replace(w, precision=p), g, prep, cells_dir / p, peak_tflops, repeat)
        for p in HF_PRECISIONS
    }
    good = [p for p in HF_PRECISIONS if ok(rows[p])]
    winner = max(good, key=lambda p: rows[p]["tokens_per_sec_per_device"]) if good else HF_PRECISIONS[0]
    row = dict(rows[winner])
    row["precision_runs"] = {
        p: {k: r.get(k) for k in ("status", "tokens_per_sec_per_device", "message", "cell_dir")}
        for p, r in rows.items()
    }
    return row


def throughput(step_end_sec: Sequence[float], w: Workload, g: int) -> tuple[float, float] | None:
    """(tokens/s, seconds) over the measured steps: end of warm-up step W to end of step W + steps."""
    total = w.warmup_steps + w.steps
    if len(step_end_sec) < total:
        return None
    seconds = step_end_sec[total - 1] - step_end_sec[w.warmup_steps - 1]
    if seconds <= 0:
        return None
    return w.steps * g * w.seq_len / seconds, seconds


def run_cell(
    spec: SystemSpec,
    w: Workload,
    g: int,
    prep: Prepared,
    cells_dir: Path,
    peak_tflops: float | None,
    repeat: int = 0,
) -> dict[str, Any]:
    """One (system, global batch) cell in its own process group -> one row of bench.json. A cell planned as
    skipped (its strategy cannot run on these processes, or its batch cannot be split) runs nothing."""
    if cell_skip(w, spec, g):
        return {**planned_row(spec, w, g), "wall_sec": 0.0, "command": ""}
    if spec.kind != "overdrive" and w.precision == "auto":
        return best_precision(spec, w, g, prep, cells_dir, peak_tflops, repeat)
    cell = cells_dir / (f"{spec.name}-gbs{g}" + (f"-r{repeat + 1}" if w.repeats > 1 else ""))
    cell.mkdir(parents=True, exist_ok=True)
    if spec.kind == "overdrive":
        argv = overdrive_command(spec, w, g, prep, cell)
    else:
        argv = hf_command(spec, w, g, prep, cell)
    (cell / "command.txt").write_text(shlex.join(argv) + "\n")
    load_before = os.getloadavg()[0]
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    outcome = run_process(argv, w.timeout, cell, child_env(w.device, w.threads))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_sec = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    row = planned_row(spec, w, g)
    row.update(
        {
            "precision": w.precision,  # an overdrive run on auto reports what it chose (below)
            "status": outcome.status,
            "message": outcome.message,
            "wall_sec": round(outcome.wall_sec, 2),
            "returncode": outcome.returncode,
            "command": shlex.join(argv),
            "cell_dir": str(cell),
            "load_avg_before": round(load_before, 2),
            "load_avg_after": round(os.getloadavg()[0], 2),
            "cpu_sec": round(
                cpu_sec, 1
            ),  # CPU time of the cell's processes (all ranks): starvation shows here
        }
    )
    if outcome.status != "ok":
        return row
    if spec.kind == "overdrive":
        result = read_overdrive_run(cell / "run")
    else:
        path = cell / "result.json"
        result = json.loads(path.read_text()) if path.is_file() else None
    timing = throughput(result.get("step_end_sec", []), w, g) if result else None
    if result is None or timing is None:
        row.update(status="error", message="the run finished but wrote no per-step timings")
        return row
    tps, seconds = timing
    per_device = tps / row["nproc"]
    tflops = per_device * prep.flops_per_token / 1e12
    row.update(
        tokens_per_sec=tps,
        tokens_per_sec_per_device=per_device,
        tflops_per_device=tflops,
        mfu=tflops / peak_tflops if peak_tflops else None,
        peak_memory_bytes=result.get("peak_memory_bytes"),
        first_losses=result["losses"][:FIRST_LOSSES],
        losses=result["losses"],
        measured_sec=round(seconds, 3),
        sec_per_iter=seconds / w.steps,
    )
    for key in (
        "distributed_type",
        "mixed_precision",
        "world_size",
        "micro_batch_size",
        "accumulation_steps",
        "precision",
        "strategy_choice",
    ):
        if key in result:
            row[key] = result[key]
    row["pipeline_bubble"] = pipeline_bubble(row)  # from the micro-batches per step the run reported
    return row


# ------------------------------------------------------------------------------------------ the whole bench
BENCH_ARTIFACTS = ("bench.md", "bench.json", "bench.png", "work")


def plan_output(output_dir: Path, overwrite: bool) -> None:
    """Refuse to clobber an earlier bench; with --overwrite remove only what a bench writes."""
    from overdrive.atomic import remove_entries

    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"output dir {output_dir} is a file; pass a directory to --output-dir")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise UsageError(
                f"output dir {output_dir} already exists and is not empty; pass --overwrite or another --output-dir"
            )
        remove_entries(output_dir, BENCH_ARTIFACTS)


def merge_repeats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest successful repeat stands for the cell: background load only ever slows a run down, so the
    fastest is the closest to the machine's quiet speed. Every repeat's number stays in `repeats`."""
    from overdrive.bench.report import ok

    good = [r for r in rows if ok(r)]
    chosen = dict(max(good, key=lambda r: r["tokens_per_sec_per_device"]) if good else rows[-1])
    if len(rows) > 1:
        keys = (
            "status",
            "tokens_per_sec_per_device",
            "measured_sec",
            "wall_sec",
            "load_avg_before",
            "cell_dir",
        )
        chosen["repeats"] = [{k: r.get(k) for k in keys} for r in rows]
    return chosen


def run_bench(
    w: Workload, output_dir: Path, keep_work: bool = False, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Prepare once, run every cell (batch-size-major, so background load hits all systems alike), report."""
    import shutil

    import torch

    from overdrive.bench import report
    from overdrive.metrics import peak_tflops

    output_dir = output_dir.absolute()  # cells run in their own directories: every path they get is absolute
    work = output_dir / "work"
    started = time.time()
    prep = prepare(w, work, log)
    peak = peak_tflops(torch.device("cuda")) if w.device == "cuda" and torch.cuda.is_available() else None
    bench: dict[str, Any] = {
        "workload": w.to_dict(),
        "environment": report.environment(w.device),
        "model": {
            "config": w.model_config,
            "num_params": prep.num_params,
            "vocab_size": prep.vocab_size,
            "flops_per_token": prep.flops_per_token,
            "peak_tflops_per_device": peak,
        },
        "data": {"source": prep.data_source, "rows": prep.num_rows, "tokens_per_row": w.seq_len},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "rows": [],
    }
    cells = [(g, s) for g in w.batch_sizes for s in w.systems]
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {(s.name, g): [] for g, s in cells}
    total = len(cells) * w.repeats
    for i, (rep, (g, spec)) in enumerate(((r, c) for r in range(w.repeats) for c in cells), 1):
        tag = f"[{i}/{total}] {spec.name}, global batch {g}" + (
            f", repeat {rep + 1}" if w.repeats > 1 else ""
        )
        log(f"{tag} ...")
        row = run_cell(spec, w, g, prep, work / "cells", peak, rep)
        runs[(spec.name, g)].append(row)
        log(f"{tag}: {report.cell_summary(row)}")
        bench["rows"] = [merge_repeats(v) for v in runs.values() if v]
        report.write_json_only(bench, output_dir)  # partial results survive an interrupted bench
    bench["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    bench["wall_sec"] = round(time.time() - started, 1)
    bench["summary"] = report.summarize(bench)
    if not keep_work:
        shutil.rmtree(work / "init", ignore_errors=True)
        shutil.rmtree(work / "data", ignore_errors=True)
    report.write_all(bench, output_dir)
    return bench
