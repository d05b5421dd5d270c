"""`overdrive bench`: report writers on synthetic cells, failure statuses from real child processes, and one
micro end-to-end bench whose systems must train the same thing (same first losses)."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from overdrive.bench import report, runner
from overdrive.bench.cli import add_bench_parser, run_bench
from overdrive.bench.oom_kills import oom_kill_counts, oom_killer_fired
from overdrive.bench.presets import SystemSpec, Workload, parse_batch_sizes, parse_systems, parse_variant
from overdrive.bench.runner import check_overdrive_args, classify, plan_output, run_process, throughput
from overdrive.cli import OneLineParser, main
from overdrive.errors import UsageError

PY = sys.executable


def alive(pid: int) -> bool:
    """Running or sleeping; a killed process whose new parent has not reaped it yet is a zombie, not alive."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True  # no /proc (macOS): trust kill
    return state not in ("Z", "X")


def bench_parser() -> OneLineParser:
    parser = OneLineParser(prog="overdrive")
    add_bench_parser(parser.add_subparsers(dest="command", parser_class=OneLineParser))
    return parser


def synthetic_row(system: str, g: int, status: str, tps: float | None = None, **extra) -> dict:
    return {
        "system": system,
        "kind": "overdrive" if system.startswith("overdrive") else system,
        "global_batch_size": g,
        "micro_batch_size": g,
        "accumulation_steps": 1,
        "nproc": 1,
        "status": status,
        "message": extra.pop("message", ""),
        "tokens_per_sec": tps,
        "tokens_per_sec_per_device": tps,
        "tflops_per_device": tps * 1e-6 if tps else None,
        "mfu": None,
        "peak_memory_bytes": 2**30 if tps else None,
        "first_losses": extra.pop("first_losses", []),
        "measured_sec": 1.0 if tps else None,
        "wall_sec": 3.0,
        "command": f"python -m {system}",
        **extra,
    }


def synthetic_bench() -> dict:
    rows = [
        synthetic_row("hf-trainer", 8, "ok", 1000.0, first_losses=[9.0, 8.5]),
        synthetic_row("hf-deepspeed", 8, "timeout", message="no result within 300 s; killed"),
        synthetic_row("overdrive", 8, "ok", 1500.0, first_losses=[9.0, 8.4995]),
        synthetic_row("hf-trainer", 16, "oom", message="torch.OutOfMemoryError: CUDA out of memory"),
        synthetic_row("hf-deepspeed", 16, "error", message="ValueError: boom"),
        synthetic_row("overdrive", 16, "ok", 2000.0),
    ]
    return {
        "workload": {
            "preset": "synthetic",
            "model_config": "tiny",
            "seq_len": 256,
            "precision": "bf16",
            "attn_implementation": "sdpa",
            "warmup_steps": 1,
            "steps": 2,
            "nproc": 1,
            "device": "cpu",
        },
        "environment": {
            "device": "cpu",
            "device_name": "Test CPU",
            "cpu": "Test CPU",
            "cpu_cores": 2,
            "torch_threads": 2,
            "python": "3.11",
            "platform": "linux",
            "versions": {"torch": "2.x"},
            "argv": "overdrive bench",
        },
        "model": {
            "num_params": 3_000_000,
            "vocab_size": 8000,
            "flops_per_token": 1e7,
            "peak_tflops_per_device": None,
        },
        "data": {"source": "embedded", "rows": 100, "tokens_per_row": 256},
        "rows": rows,
    }


def test_bench_report_renders_failed_cells_and_ratios(tmp_path: Path) -> None:
    bench = synthetic_bench()
    report.write_all(bench, tmp_path)
    md = (tmp_path / "bench.md").read_text()
    throughput_table = md.split("## Throughput (tokens/s/device)")[1].split("**")[0]
    assert "| Global Batch Size | hf-trainer | hf-deepspeed | overdrive |" in throughput_table
    assert "| 8 | 1,000.0 | timeout | 1,500.0 |" in throughput_table
    assert "| 16 | OOM | error | 2,000.0 |" in throughput_table
    # best vs best: overdrive 2000 at 16 over HF Trainer 1000 at 8; per batch only where both ran
    assert "overdrive best / HF Trainer best = 2.00×" in md
    assert "| 8 | 1.00× | timeout | 1.50× |" in md
    assert "| 16 | OOM | error | — |" in md
    assert "5.00e-04" in md  # first-loss agreement of overdrive vs hf-trainer at batch 8

    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["summary"]["overdrive_best_over_hf_trainer_best"] == pytest.approx(2.0)
    assert data["summary"]["overdrive_best_over_hf_deepspeed_best"] is None
    statuses = {(r["system"], r["global_batch_size"]): r["status"] for r in data["rows"]}
    assert statuses[("hf-trainer", 16)] == "oom" and statuses[("hf-deepspeed", 8)] == "timeout"
    for r in data["rows"]:
        assert {"tokens_per_sec_per_device", "peak_memory_bytes", "status", "command", "first_losses"} <= set(
            r
        )
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_bench_report_without_baseline_says_na(tmp_path: Path) -> None:
    bench = synthetic_bench()
    bench["rows"] = [r for r in bench["rows"] if r["system"] != "hf-trainer"]
    report.write_all(bench, tmp_path)
    assert "overdrive best / HF Trainer best = n/a" in (tmp_path / "bench.md").read_text()


def test_bench_classify_statuses() -> None:
    assert classify(0, "out of memory warning text") == ("ok", "")
    assert classify(1, "x\ntorch.OutOfMemoryError: CUDA out of memory. Tried\n")[0] == "oom"
    # a bare SIGKILL is "killed"; "oom" only when the kernel's OOM killer fired while the cell ran
    assert classify(-9, "", oom_killed=False) == (
        "killed",
        "killed by SIGKILL, not by the kernel's out-of-memory killer (oom_kill count unchanged)",
    )
    assert classify(-9, "", oom_killed=None)[0] == "killed"
    assert classify(-9, "", oom_killed=True)[0] == "oom"
    rank_killed = "Failures:\n  rank      : 1\n  exitcode  : -9 (pid: 42)\n"
    assert classify(1, rank_killed, oom_killed=False)[0] == "killed"
    assert classify(1, rank_killed, oom_killed=True)[0] == "oom"
    assert classify(-9, "RuntimeError: CUDA error: out of memory\n", oom_killed=False)[0] == "oom"
    status, message = classify(1, "Traceback\n  File x\nValueError: bad input\n=========\n")
    assert (status, message) == ("error", "ValueError: bad input")
    assert classify(7, "")[1] == "exit code 7"
    torchrun = "[rank1]: AssertionError: batch sizes disagree\nraise ChildFailedError(\n"
    torchrun += "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n=====\n  rank : 1\n"
    assert classify(1, torchrun) == ("error", "AssertionError: batch sizes disagree")


def test_bench_run_process_statuses_from_real_children(tmp_path: Path) -> None:
    ok = run_process([PY, "-c", "print('hi')"], 60, tmp_path / "ok")
    assert ok.status == "ok" and (tmp_path / "ok" / "stdout.log").read_text() == "hi\n"

    err = run_process([PY, "-c", "raise ValueError('bad thing')"], 60, tmp_path / "err")
    assert (err.status, err.message) == ("error", "ValueError: bad thing")

    script = "import sys; sys.stderr.write('torch.OutOfMemoryError: CUDA out of memory. Tried 2 GiB\\n'); sys.exit(1)"
    oom = run_process([PY, "-c", script], 60, tmp_path / "oom")
    assert oom.status == "oom" and "CUDA out of memory" in oom.message

    # a child that started a grandchild: the whole process group goes on timeout
    pid_file = tmp_path / "grandchild.pid"
    hang = textwrap.dedent(
        f"""
        import subprocess, time
        p = subprocess.Popen([{PY!r}, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(p.pid))
        time.sleep(120)
        """
    )
    t0 = time.perf_counter()
    out = run_process([PY, "-c", hang], 3, tmp_path / "hang")
    assert out.status == "timeout" and time.perf_counter() - t0 < 30
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(grandchild)


SELF_KILL = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"


def test_bench_sigkilled_child_is_killed_not_oom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real SIGKILL with the kernel's OOM-kill counters unchanged is reported as killed."""
    monkeypatch.setattr(runner, "oom_kill_counts", lambda: {"/proc/vmstat": 4})
    out = run_process([PY, "-c", SELF_KILL], 60, tmp_path / "killed")
    assert (out.status, out.returncode) == (
        "killed",
        -9,
    ) and "not by the kernel's out-of-memory" in out.message


def test_bench_sigkill_while_the_oom_killer_fired_is_oom(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readings = iter([{"/sys/fs/cgroup/memory.events": 0}, {"/sys/fs/cgroup/memory.events": 1}])
    monkeypatch.setattr(runner, "oom_kill_counts", lambda: next(readings))
    out = run_process([PY, "-c", SELF_KILL], 60, tmp_path / "oom")
    assert out.status == "oom" and "out-of-memory killer fired" in out.message


def test_bench_oom_kill_counters_are_read_from_the_kernel_files(tmp_path: Path) -> None:
    assert oom_killer_fired({"a": 1, "b": 0}, {"a": 1, "b": 2}) is True
    assert oom_killer_fired({"a": 1}, {"a": 1}) is False
    assert oom_killer_fired({}, {}) is None and oom_killer_fired({"a": 1}, {}) is None
    counts = oom_kill_counts()
    if Path("/proc/vmstat").is_file() and "oom_kill " in Path("/proc/vmstat").read_text():
        assert counts["/proc/vmstat"] >= 0  # a Linux kernel since 4.13 counts its OOM kills here


def test_bench_hf_cell_turns_oom_into_status(tmp_path: Path) -> None:
    """The HF cell's own OOM path: marker line, exit code 3, and the runner reads it as oom."""
    script = textwrap.dedent(
        """
        import sys, torch
        import overdrive.bench.hf_trainer_cell as cell
        def run(spec):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        cell.run = run
        sys.exit(cell.main([sys.argv[1]]))
        """
    )
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"result_file": str(tmp_path / "result.json")}))
    out = run_process([PY, "-c", script, str(spec)], 120, tmp_path / "cell")
    assert out.returncode == 3 and out.status == "oom"
    assert out.message.startswith("rank 0: OutOfMemoryError: CUDA out of memory")
    assert not (tmp_path / "result.json").exists()


def test_bench_throughput_uses_measured_steps_only() -> None:
    w = Workload(None, "tiny", 256, (8,), steps=2, warmup_steps=2, precision="bf16", device="cpu", nproc=1,
                 micro_batch_size=None, attn_implementation="sdpa")  # fmt: skip
    # steps end at 10 s, 11 s (warm-up, slow), then 12 s and 14 s: 2 steps × 8 × 256 tokens in 3 s
    tps, seconds = throughput([10.0, 11.0, 12.0, 14.0], w, 8)
    assert seconds == pytest.approx(3.0) and tps == pytest.approx(2 * 8 * 256 / 3.0)
    assert throughput([1.0, 2.0], w, 8) is None  # a run that stopped early has no number


def test_bench_input_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown system"):
        parse_systems("hf-trainer,megatron", "cpu", 1, None)
    assert parse_systems("overdrive", "cpu", 1, None)[0].extra_args == ()  # overdrive's default: auto
    assert parse_systems("overdrive", "cuda", 8, None)[0].extra_args == ("--strategy", "auto")
    assert parse_systems("overdrive", "cpu", 2, None)[0].extra_args == ("--strategy", "auto")
    assert parse_variant("eager=--precision bf16").name == "overdrive-eager"
    with pytest.raises(UsageError, match="NAME=FLAGS"):
        parse_variant("--compile")
    with pytest.raises(UsageError, match="positive"):
        parse_batch_sizes("8,0")
    with pytest.raises(UsageError, match="fixed by the workload"):
        check_overdrive_args(SystemSpec("overdrive", "overdrive", ("--compile", "--precision=fp32")))
    parser = bench_parser()
    with pytest.raises(UsageError, match="not a multiple"):
        run_bench(parser.parse_args(["bench", "--batch-sizes", "8", "--micro-batch-size", "3", "--dry-run"]))
    with pytest.raises(UsageError, match="warmup-steps must be at least 1"):
        run_bench(parser.parse_args(["bench", "--warmup-steps", "0", "--dry-run"]))
    assert main(["bench", "--warmup-steps", "0", "--dry-run"]) == 2  # one line, exit 2, via `overdrive bench`
    existing = tmp_path / "out"
    existing.mkdir()
    (existing / "bench.md").write_text("old")
    (existing / "mine.txt").write_text("keep")
    with pytest.raises(UsageError, match="--overwrite"):
        plan_output(existing, overwrite=False)
    plan_output(existing, overwrite=True)
    assert [p.name for p in existing.iterdir()] == ["mine.txt"]


# ------------------------------------------------------------------ strategy cells and the seed 004 table
def seed_rows() -> list[dict]:
    """Cells as the runner writes them for strategy columns: tp/pp/dp, micro × accumulation, sec/iter."""
    layouts = {  # system: (strategy, nproc, tp, dp, micro, accum)
        "overdrive-single": ("single", 1, 1, 1, 8, 1),
        "overdrive-tp": ("tp", 4, 4, 1, 2, 4),
        "overdrive-fsdp-tp": ("/x/fsdp-tp.yaml", 4, 2, 2, 2, 2),
    }
    rows = []
    for system, (strategy, nproc, tp, dp, micro, accum) in layouts.items():
        tps = {"overdrive-single": 1000.0, "overdrive-tp": 500.0, "overdrive-fsdp-tp": None}[system]
        row = synthetic_row(system, 8, "ok" if tps else "oom", tps, strategy=strategy, nproc=nproc, tp=tp)
        row.update(pp=1, dp=dp, micro_batch_size=micro, accumulation_steps=accum, seq_len=256)
        row.update(sec_per_iter=0.25 * tp if tps else None, measured_steps=4)
        row["peak_memory_bytes"] = 3 * 2**28 if tps else None
        rows.append(row)
    return rows


def test_bench_seed_table_has_the_seed_columns_and_values(tmp_path: Path) -> None:
    bench = synthetic_bench()
    bench["rows"] = seed_rows()
    report.write_all(bench, tmp_path)
    md = (tmp_path / "bench.md").read_text()
    section = md.split("## Runs (seed 004 columns)")[1].split("## Ratio")[0]
    header = (
        "| Method | tp | pp | micro batch | grad accumulation | global batch | seq | processes | "
        "pipeline bubble (schedule model) | memory (peak per device, GiB) | sec/iter | tokens/s/device |"
    )
    assert header in section
    assert "| overdrive-single | 1 | 1 | 8 | 1 | 8 | 256 | 1 | - | 0.75 | 0.250 | 1,000.0 |" in section
    assert "| overdrive-tp | 4 | 1 | 2 | 4 | 8 | 256 | 4 | - | 0.75 | 1.000 | 500.0 |" in section
    # a failed cell keeps its layout and shows its status, never a number
    assert "| overdrive-fsdp-tp | 2 | 1 | 2 | 2 | 8 | 256 | 4 | - | — | — | OOM |" in section
    # the terminal print (everything before the ratio table) includes it
    assert md.index("## Runs (seed 004 columns)") < md.index("## Ratio to HF Trainer")
    rows = {r["system"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    tp = rows["overdrive-tp"]
    assert (tp["tp"], tp["pp"], tp["dp"], tp["nproc"]) == (4, 1, 1, 4)
    assert (tp["micro_batch_size"], tp["accumulation_steps"], tp["global_batch_size"]) == (2, 4, 8)
    assert (tp["sec_per_iter"], tp["peak_memory_bytes"], tp["tokens_per_sec_per_device"]) == (
        1.0,
        3 * 2**28,
        500,
    )


def test_bench_seed_table_reads_older_rows_and_names_strategies() -> None:
    """Rows of a bench.json written before strategy columns (no tp/pp/sec_per_iter) still render; a column whose
    name does not say its strategy gets it in parentheses (a YAML file by its stem)."""
    old = synthetic_row("overdrive", 8, "ok", 1000.0, measured_steps=4)
    old["measured_sec"] = 2.0
    w = synthetic_bench()["workload"]
    assert "| overdrive | 1 | 1 | 8 | 1 | 8 | 256 | 1 | - | 1.00 | 0.500 | 1,000.0 |" in report.seed_table(
        [old], w
    )
    assert report.method({"system": "overdrive", "strategy": "ddp"}) == "overdrive (ddp)"
    assert report.method({"system": "overdrive-x", "strategy": "/a/b/mine.yaml"}) == "overdrive-x (mine)"
    assert report.method({"system": "overdrive-fsdp-tp", "strategy": "fsdp-tp"}) == "overdrive-fsdp-tp"
    assert report.method({"system": "hf-trainer", "strategy": None}) == "hf-trainer"


@pytest.mark.slow
def test_bench_micro_end_to_end_same_losses(
    micro_config: Path, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF Trainer and overdrive on the same rows, order and initial weights: fp32 losses agree to 1e-4."""
    monkeypatch.chdir(tmp_path)  # a relative --output-dir must work although every cell runs in its own dir
    out = Path("bench")
    argv = [
        "bench",
        "--model-config",
        str(micro_config),
        "--train-file",
        str(text_file),
        "--vocab-size",
        "512",
    ]
    argv += [
        "--seq-len",
        "64",
        "--batch-sizes",
        "8",
        "--steps",
        "2",
        "--warmup-steps",
        "1",
        "--precision",
        "fp32",
    ]
    argv += [
        "--systems",
        "hf-trainer,overdrive",
        "--overdrive-args",
        "--strategy single",  # plain overdrive (the pre-auto default) against HF Trainer, fp32
        "--timeout",
        "240",
        "--output-dir",
        "bench",
    ]
    assert main(argv) == 0  # through the real `overdrive` command line

    data = json.loads((out / "bench.json").read_text())
    rows = {r["system"]: r for r in data["rows"]}
    assert set(rows) == {"hf-trainer", "overdrive"}
    for r in rows.values():
        assert r["status"] == "ok", r["message"]
        assert r["tokens_per_sec_per_device"] > 0 and r["peak_memory_bytes"] > 0
        assert len(r["first_losses"]) == 3
    assert rows["hf-trainer"]["distributed_type"] == "NO"
    # Same data, init and optimizer in fp32: only reduction order may differ (observed: identical).
    for a, b in zip(rows["hf-trainer"]["first_losses"], rows["overdrive"]["first_losses"], strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    md = (out / "bench.md").read_text()
    assert "overdrive best / HF Trainer best = " in md and "| 8 |" in md
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "work" / "init").exists()  # the initial weights are removed without --keep-work
