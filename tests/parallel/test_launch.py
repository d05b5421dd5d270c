"""`overdrive launch`: torchrun argv (checked against real torchrun) and the SLURM sbatch script."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from overdrive.errors import UsageError
from overdrive.parallel.distributed import LaunchEnv, restart_safe_store
from overdrive.parallel.launch import (
    SHARED_STORE_ENV,
    ProcessesFailed,
    add_launch_arguments,
    build_torchrun_argv,
    failure_exit_code,
    render_sbatch,
    run_launch,
    run_torchrun,
    torchrun_env,
)

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("value", [1, "8", "auto", "cpu", "gpu", "xpu"])
def test_argv_accepts_what_torchrun_accepts(value: int | str) -> None:
    argv = build_torchrun_argv([], nproc_per_node=value, nnodes="1:2", rdzv_endpoint="h:29500", python="py")
    assert argv[argv.index("--nproc-per-node") + 1] == str(value) and "--nnodes" in argv


def test_single_node_argv_uses_standalone() -> None:
    argv = build_torchrun_argv(["--config", "run.yaml"], nproc_per_node=4, python="py")
    assert argv == [
        "py", "-m", "torch.distributed.run", "--nproc-per-node", "4", "--nnodes", "1", "--standalone",
        "--max-restarts", "0", "-m", "overdrive", "train", "--config", "run.yaml",
    ]  # fmt: skip


def test_multi_node_argv_uses_c10d_rendezvous() -> None:
    argv = build_torchrun_argv(
        ["--strategy", "fsdp"], nproc_per_node=8, nnodes=2, node_rank=1, rdzv_endpoint="node0:29500",
        rdzv_id="job7", max_restarts=3, python="py",
    )  # fmt: skip
    text = " ".join(argv)
    assert "--nnodes 2 --node-rank 1" in text
    assert "--rdzv-backend c10d --rdzv-endpoint node0:29500 --rdzv-id job7" in text
    assert "--standalone" not in argv
    assert argv[-6:] == ["3", "-m", "overdrive", "train", "--strategy", "fsdp"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nnodes": 2}, "needs --rdzv-endpoint"),
        ({"rdzv_endpoint": "host name:1"}, "HOST:PORT"),
        ({"max_restarts": -1}, "must not be negative"),
        ({"nproc_per_node": 0}, "--nproc-per-node must be a positive number or one of auto, cpu, gpu, xpu"),
        ({"nproc_per_node": "abc"}, "got 'abc'"),
        ({"nproc_per_node": "-1"}, "got '-1'"),
        ({"nnodes": "0"}, "--nnodes needs 1 <= MIN <= MAX"),
        ({"nnodes": "4:2", "rdzv_endpoint": "h:1"}, "--nnodes needs 1 <= MIN <= MAX"),
        ({"nnodes": "two"}, "--nnodes must be a positive number or MIN:MAX"),
        ({"nnodes": 2, "rdzv_endpoint": "h:70000"}, "port 1-65535"),
        ({"nnodes": 2, "rdzv_endpoint": "h:1", "node_rank": 2}, "--node-rank must be in 0..1"),
        ({"nnodes": 2, "rdzv_endpoint": "h:1", "rdzv_id": "a b"}, "--rdzv-id"),
    ],
)
def test_argv_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        build_torchrun_argv([], **kwargs)


def _sbatch(**kw) -> str:
    defaults = dict(nodes=4, gpus_per_node=8, partition="gpu", time="1-12:00:00", job_name="llama-8b",
                    output_dir="/scratch/logs", setup=["source /opt/venv/bin/activate"])  # fmt: skip
    return render_sbatch(["--config", "run 1.yaml", "--strategy", "fsdp"], **{**defaults, **kw})


def test_sbatch_is_valid_bash_with_the_right_values(tmp_path: Path) -> None:
    script = _sbatch()
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)
    for line in [
        "#SBATCH --job-name=llama-8b",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=1-12:00:00",
        "#SBATCH --output=/scratch/logs/%x-%j.out",
        'node_list=$(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        "head_node=${node_list%%$'\\n'*}",
        "source /opt/venv/bin/activate",
    ]:
        assert line in script.splitlines()
    assert script.startswith("#!/bin/bash\n")
    assert "| head" not in script  # under pipefail a pipe into head can end the job with SIGPIPE (141)


SCONTROL_AT_ONCE = "#!/bin/bash\nprintf 'gpu-a17\\ngpu-a18\\n'\n"
# a long node list arrives in several writes: the reader of the first line may be gone before the second
SCONTROL_IN_PIECES = "#!/bin/bash\necho gpu-a17\nsleep 0.3\necho gpu-a18\n"


def test_sbatch_runs_one_torchrun_per_node_against_the_head_node(tmp_path: Path) -> None:
    """Execute the script with stand-ins for scontrol and srun and check the command srun receives."""
    run_sbatch_with_stand_ins(tmp_path, SCONTROL_AT_ONCE)


def test_sbatch_survives_a_node_list_written_in_pieces(tmp_path: Path) -> None:
    """`scontrol ... | head -n 1` under pipefail failed here every time with exit 141 (SIGPIPE)."""
    run_sbatch_with_stand_ins(tmp_path, SCONTROL_IN_PIECES)


def run_sbatch_with_stand_ins(tmp_path: Path, scontrol: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(scontrol)
    (bin_dir / "srun").write_text(
        '#!/bin/bash\necho "$TORCH_DISABLE_SHARE_RDZV_TCP_STORE" > "$SRUN_ARGS.env"\n'
        'for a in "$@"; do printf "%s\\n" "$a"; done > "$SRUN_ARGS"\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(_sbatch(setup=[]))
    env = os.environ | {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu-a[17-18]",
        "SLURM_NNODES": "4",
        "SLURM_JOB_ID": "991",
        "SRUN_ARGS": str(tmp_path / "srun.args"),
    }
    subprocess.run(["bash", str(script)], check=True, env=env)
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert args == [
        "--kill-on-bad-exit=1", "torchrun", "--nnodes", "4", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "gpu-a17:29500", "--rdzv-id", "991", "--max-restarts", "0", "-m", "overdrive", "train",
        "--config", "run 1.yaml", "--strategy", "fsdp",
    ]  # fmt: skip
    # restarts get a fresh rendezvous store (torchrun's shared store keeps the dead attempt's addresses)
    assert (tmp_path / "srun.args.env").read_text().strip() == "1"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes": 0}, "--nodes must be at least 1"),
        ({"time": "forever"}, "--time must be a SLURM time"),
        ({"job_name": "a b"}, "--job-name"),
        ({"partition": "gpu;rm"}, "--partition"),
        ({"gpus_per_node": 0}, "pass --nproc-per-node"),
    ],
)
def test_sbatch_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        _sbatch(**kwargs)


def test_cpu_nodes_use_nproc_per_node() -> None:
    script = _sbatch(gpus_per_node=0, nproc_per_node=2)
    assert "--gpus-per-node" not in script and "--nproc-per-node 2" in script


def _parse(argv: list[str]) -> argparse.Namespace:
    return add_launch_arguments(argparse.ArgumentParser(prog="overdrive launch")).parse_args(argv)


def test_cli_hook_dry_run(capsys) -> None:
    assert run_launch(_parse(["--nproc-per-node", "2", "--dry-run", "train", "--config", "x.yaml"])) == 0
    printed = capsys.readouterr().out
    assert "--nproc-per-node 2" in printed and printed.rstrip().endswith("-m overdrive train --config x.yaml")
    assert run_launch(_parse(["--dry-run", "--", "--max-steps", "5"])) == 0
    assert capsys.readouterr().out.rstrip().endswith("overdrive train --max-steps 5")


def test_cli_hook_slurm_writes_script(tmp_path: Path, capsys) -> None:
    args = _parse(["--slurm", "--nodes", "2", "--gpus-per-node", "4", "--slurm-dir", str(tmp_path / "s"),
                   "--job-name", "exp", "train", "--strategy", "zero2"])  # fmt: skip
    assert run_launch(args) == 0
    script = (tmp_path / "s" / "exp.sbatch").read_text()
    assert (
        "#SBATCH --nodes=2" in script
        and "--nproc-per-node 4" in script
        and "train --strategy zero2" in script
    )
    captured = capsys.readouterr()
    assert captured.out == script  # the script itself goes to stdout
    assert "submit with: sbatch" in captured.err


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from overdrive.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nproc-per-node", "0", "--dry-run"], "--nproc-per-node must be a positive number"),
        (["--nproc-per-node", "abc", "--dry-run"], "got 'abc'"),
        (["--nproc-per-node", "abc"], "got 'abc'"),
        (["--nnodes", "0", "--dry-run"], "--nnodes needs 1 <= MIN <= MAX"),
        (["--nnodes", "x:2", "--dry-run"], "--nnodes must be a positive number or MIN:MAX"),
        (["--max-restarts", "-2", "--dry-run"], "--max-restarts must not be negative"),
        (
            ["--nproc-per-node", "2", "--dry-run", "train", "--bogus-flag"],
            "unrecognized arguments: --bogus-flag",
        ),
        (["--dry-run", "train", "--max-steps", "ten"], "--max-steps"),
        (["--slurm", "--nproc-per-node", "0", "--dry-run"], "--nproc-per-node must be a positive number"),
        (["--slurm", "--cpus-per-task", "-1", "--dry-run"], "--cpus-per-task must be at least 1"),
        (["--slurm", "--max-restarts", "-1", "--dry-run"], "--max-restarts must not be negative"),
        (["--slurm", "--dry-run", "train", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
        (["--slurm", "--nnodes", "2", "--dry-run"], "--nnodes applies to torchrun launches, not --slurm"),
        (["--submit", "--dry-run"], "--submit applies to --slurm only"),
    ],
)
def test_bad_launch_input_is_one_line_exit_2_even_in_dry_run(argv: list[str], message: str, capsys) -> None:
    code, out, err = run_cli(["launch", *argv], capsys)
    assert (code, out) == (2, "")  # nothing printed as if it would run
    assert err.startswith("overdrive: error: ") and err.count("\n") == 1 and message in err, err


def test_gpu_processes_need_a_gpu_here(monkeypatch, capsys) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli(["launch", "--nproc-per-node", "gpu", "train"], capsys)
    assert code == 2 and "needs a CUDA GPU on this machine" in err


def test_submit_without_sbatch_writes_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code, _, err = run_cli(["launch", "--slurm", "--submit", "--slurm-dir", str(tmp_path / "s")], capsys)
    assert code == 2 and "--submit needs sbatch" in err and not (tmp_path / "s").exists()


def test_bad_train_flag_fails_in_the_launcher_before_torchrun() -> None:
    """Through the real command: one line and exit 2, not torchrun's ChildFailedError traceback (exit 1)."""
    argv = [sys.executable, "-m", "overdrive", "launch", "--nproc-per-node", "2", "train", "--bogus-flag"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr == "overdrive: error: unrecognized arguments: --bogus-flag (see `overdrive --help`)\n"


def failures(**codes: int) -> dict[int, SimpleNamespace]:
    return {int(rank[1:]): SimpleNamespace(exitcode=code) for rank, code in codes.items()}


def test_usage_errors_on_the_ranks_exit_2_quietly() -> None:
    assert failure_exit_code(failures(r0=2, r1=2)) == 2
    assert failure_exit_code(failures(r0=2, r1=-signal.SIGTERM)) == 2  # torchrun stopped rank 1 after rank 0


@pytest.mark.parametrize(
    ("codes", "exit_code", "message"),
    [
        ({"r0": 1, "r1": -signal.SIGTERM}, 1, "rank 0 exited with code 1 (see their output above)"),
        ({"r0": 3, "r1": 3}, 3, "rank 0 exited with code 3, rank 1 exited with code 3"),
        ({"r0": 3, "r1": -signal.SIGKILL}, 1, "rank 0 exited with code 3, rank 1 was killed by SIGKILL"),
        ({"r1": -signal.SIGKILL}, 128 + signal.SIGKILL, "rank 1 was killed by SIGKILL"),
        ({"r0": -signal.SIGTERM}, 128 + signal.SIGTERM, "rank 0 was killed by SIGTERM"),
        ({f"r{r}": 1 for r in range(6)}, 1, "rank 3 exited with code 1 and 2 more"),
    ],
)
def test_other_failures_name_each_rank(codes: dict, exit_code: int, message: str) -> None:
    with pytest.raises(ProcessesFailed, match=re.escape(message)) as info:
        failure_exit_code(failures(**codes))
    assert info.value.exit_code == exit_code and "\n" not in str(info.value)


@pytest.mark.distributed
@pytest.mark.parametrize(("child_exit", "expected"), [(0, 0), (2, 2), (1, 1)])
def test_real_torchrun_returns_the_ranks_exit_code(child_exit, expected, monkeypatch, capfd) -> None:
    """torchrun runs in this process: its ChildFailedError becomes an exit code, never a traceback."""
    monkeypatch.setenv("PYTHONPATH", str(HERE))
    monkeypatch.setenv("PROBE_EXIT", str(child_exit))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv(SHARED_STORE_ENV, raising=False)
    environ, handler = dict(os.environ), signal.getsignal(signal.SIGTERM)
    argv = build_torchrun_argv(nproc_per_node=2, module="_exit_probe", command=None)[3:]
    if expected == 1:
        with pytest.raises(ProcessesFailed, match="rank 0 exited with code 1") as info:
            run_torchrun(argv)
        assert info.value.exit_code == 1
    else:
        assert run_torchrun(argv) == expected
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ChildFailedError" not in err and "failed (exitcode" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("overdrive: error:")]
    assert len(lines) == (0 if child_exit == 0 else 2) or child_exit == 1  # torchrun may stop rank 1 first
    # the launcher's own process is left as it was (torchrun's agent changes both)
    assert dict(os.environ) == environ and signal.getsignal(signal.SIGTERM) == handler


@pytest.mark.distributed
def test_argv_starts_real_torchrun(tmp_path: Path) -> None:
    """The argv we build is accepted by torchrun and starts the requested processes with our arguments."""
    argv = build_torchrun_argv(["--flag", "v"], nproc_per_node=2, module="_launch_probe", command="train")
    env = os.environ | {"PYTHONPATH": str(HERE), "PROBE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    subprocess.run(argv, env=env, check=True, timeout=120, capture_output=True)
    import json

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["RANK"] for r in ranks] == ["0", "1"] and {r["WORLD_SIZE"] for r in ranks} == {"2"}
    assert all(r["argv"] == ["train", "--flag", "v"] for r in ranks)


def test_launch_gives_torchrun_a_fresh_store_per_restart_unless_the_user_chose() -> None:
    assert torchrun_env({"PATH": "/bin"}) == {"PATH": "/bin", SHARED_STORE_ENV: "1"}
    assert torchrun_env({SHARED_STORE_ENV: "0"})[SHARED_STORE_ENV] == "0"


def test_multi_node_restarts_on_a_shared_store_warn(monkeypatch) -> None:
    """Across nodes restart counts can differ, so the store cannot be prefixed by them: say what to set."""
    import datetime

    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    env = LaunchEnv(rank=0, local_rank=0, world_size=4, local_world_size=2, launched=True)
    with pytest.warns(UserWarning, match=f"export {SHARED_STORE_ENV}=1"):
        assert restart_safe_store(env, datetime.timedelta(seconds=5)) is None
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")  # no restarts: nothing to isolate, no warning
    assert restart_safe_store(env, datetime.timedelta(seconds=5)) is None
