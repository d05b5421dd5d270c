"""`overdrive launch`: torchrun argv (checked against real torchrun) and the SLURM sbatch script."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

import pytest

from overdrive.errors import UsageError
from overdrive.parallel.distributed import LaunchEnv, restart_safe_store
from overdrive.parallel.launch import (
    SHARED_STORE_ENV,
    add_launch_arguments,
    build_torchrun_argv,
    render_sbatch,
    run_launch,
    torchrun_env,
)

HERE = Path(__file__).resolve().parent


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
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "source /opt/venv/bin/activate",
    ]:
        assert line in script.splitlines()
    assert script.startswith("#!/bin/bash\n")


def test_sbatch_runs_one_torchrun_per_node_against_the_head_node(tmp_path: Path) -> None:
    """Execute the script with stand-ins for scontrol and srun and check the command srun receives."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf 'gpu-a17\\ngpu-a18\\n'\n")
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
