"""`overdrive launch`: start `overdrive train` on several processes/nodes through torchrun, or render SLURM.

This is deliberately thin: torchrun does rendezvous, restarts and failure propagation; we only build its
argument list (so users need not remember it) and, for clusters, an sbatch script that runs one torchrun
agent per node with the first node of the allocation as the c10d rendezvous host.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from overdrive.atomic import write_text
from overdrive.errors import UsageError

DEFAULT_PORT = 29500
# torchrun keeps one rendezvous store across --max-restarts attempts unless this is set; stale keys of the
# previous attempt then break the restarted process group (see distributed.restart_safe_store).
SHARED_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def build_torchrun_argv(
    train_args: Sequence[str] = (),
    *,
    nproc_per_node: int | str = 1,
    nnodes: int | str = 1,
    node_rank: int | None = None,
    rdzv_endpoint: str | None = None,
    rdzv_backend: str = "c10d",
    rdzv_id: str | None = None,
    max_restarts: int = 0,
    python: str = sys.executable,
    module: str = "overdrive",
    command: str | None = "train",
) -> list[str]:
    """argv for `python -m torch.distributed.run ... -m overdrive train ARGS`.

    Without an endpoint on one node, torchrun's --standalone mode picks a free local port; with several nodes
    a rendezvous endpoint HOST:PORT reachable from every node is required.
    """
    multi_node = str(nnodes) not in ("1", "1:1")
    if multi_node and not rdzv_endpoint:
        raise UsageError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (a host every node can reach)")
    if rdzv_endpoint and not re.fullmatch(r"[^\s:]+(:\d+)?", rdzv_endpoint):
        raise UsageError(f"--rdzv-endpoint must look like HOST:PORT, got {rdzv_endpoint!r}")
    if max_restarts < 0:
        raise UsageError(f"--max-restarts must not be negative, got {max_restarts}")
    argv = [
        python,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc_per_node),
        "--nnodes",
        str(nnodes),
    ]
    if node_rank is not None:
        argv += ["--node-rank", str(node_rank)]
    if rdzv_endpoint:
        argv += ["--rdzv-backend", rdzv_backend, "--rdzv-endpoint", rdzv_endpoint]
        if rdzv_id:
            argv += ["--rdzv-id", rdzv_id]
    else:
        argv += ["--standalone"]
    argv += ["--max-restarts", str(max_restarts), "-m", module]
    if command:
        argv.append(command)
    return argv + list(train_args)


_TIME = re.compile(r"(\d+-)?\d{1,2}(:\d{2}){0,2}|\d+")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def render_sbatch(
    train_args: Sequence[str] = (),
    *,
    nodes: int = 1,
    gpus_per_node: int = 8,
    nproc_per_node: int | None = None,
    partition: str | None = None,
    time: str = "01:00:00",
    job_name: str = "overdrive",
    output_dir: str | Path = "slurm-logs",
    cpus_per_task: int | None = None,
    port: int = DEFAULT_PORT,
    max_restarts: int = 0,
    setup: Sequence[str] = (),
    torchrun: str = "torchrun",
) -> str:
    """An sbatch script: one task per node, each running a torchrun agent for that node's GPUs.

    `setup` lines run before srun (e.g. `source .venv/bin/activate`, `module load cuda`). The rendezvous host
    is the allocation's first node, found with `scontrol show hostnames`.
    """
    procs = nproc_per_node if nproc_per_node is not None else gpus_per_node
    if nodes < 1:
        raise UsageError(f"--nodes must be at least 1, got {nodes}")
    if gpus_per_node < 0 or procs < 1:
        raise UsageError(
            "--gpus-per-node must not be negative; with 0 GPUs pass --nproc-per-node (CPU processes)"
        )
    if not _NAME.fullmatch(job_name):
        raise UsageError(f"--job-name may use letters, digits, '_', '.', '-' only, got {job_name!r}")
    if not _TIME.fullmatch(time):
        raise UsageError(f"--time must be a SLURM time such as 04:00:00 or 1-12:00:00, got {time!r}")
    if partition is not None and not _NAME.fullmatch(partition):
        raise UsageError(f"--partition must be a partition name, got {partition!r}")
    if not 1 <= port <= 65535:
        raise UsageError(f"--port must be a TCP port, got {port}")
    out = Path(output_dir)
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
    ]
    if gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    if cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={cpus_per_task}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += [
        f"#SBATCH --time={time}",
        f"#SBATCH --output={shlex.quote(str(out / '%x-%j.out'))}",
        "",
        "# Rendered by `overdrive launch --slurm`. One torchrun agent per node; the first node hosts the",
        "# c10d rendezvous, so nodes may start in any order and ranks are assigned at rendezvous.",
        "set -euo pipefail",
        *setup,
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export {SHARED_STORE_ENV}=1  # a fresh rendezvous store per restart (torchrun --max-restarts)",
        "",
    ]
    train = " ".join(shlex.quote(a) for a in train_args)
    command = [
        "srun --kill-on-bad-exit=1",
        f"  {torchrun}",
        '  --nnodes "$SLURM_NNODES"',
        f"  --nproc-per-node {procs}",
        "  --rdzv-backend c10d",
        f'  --rdzv-endpoint "$head_node:{port}"',
        '  --rdzv-id "$SLURM_JOB_ID"',
        f"  --max-restarts {max_restarts}",
        f"  -m overdrive train {train}".rstrip(),
    ]
    lines.append(" \\\n".join(command))
    return "\n".join(lines) + "\n"


def add_launch_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of `overdrive launch`; everything after them (or after `--`) goes to `overdrive train`."""
    parser.add_argument(
        "--nproc-per-node",
        default=None,
        help="processes per node: a number, gpu, cpu or auto (default 1; with --slurm: --gpus-per-node)",
    )
    parser.add_argument("--nnodes", default="1", help="number of nodes (or MIN:MAX for elastic runs)")
    parser.add_argument("--node-rank", type=int, default=None, help="this node's rank (static rendezvous)")
    parser.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the rendezvous (multi-node)")
    parser.add_argument("--rdzv-id", default=None, help="job id shared by all nodes")
    parser.add_argument("--max-restarts", type=int, default=0, help="restarts of the whole group on failure")
    parser.add_argument("--dry-run", action="store_true", help="print the command or script, run nothing")
    slurm = parser.add_argument_group("SLURM (--slurm renders an sbatch script)")
    slurm.add_argument("--slurm", action="store_true", help="write an sbatch script instead of running")
    slurm.add_argument("--nodes", type=int, default=1, help="nodes to allocate")
    slurm.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (one process each)")
    slurm.add_argument("--partition", default=None, help="SLURM partition")
    slurm.add_argument("--time", default="01:00:00", help="wall-clock limit, e.g. 04:00:00")
    slurm.add_argument("--job-name", default="overdrive", help="SLURM job name")
    slurm.add_argument("--cpus-per-task", type=int, default=None, help="CPUs for each node's torchrun agent")
    slurm.add_argument("--slurm-dir", default="slurm", help="where the script and the job logs go")
    slurm.add_argument("--setup", action="append", default=[], help="shell line run before srun (repeatable)")
    slurm.add_argument("--submit", action="store_true", help="submit the script with sbatch")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="arguments for `overdrive train`")
    return parser


def run_launch(args: argparse.Namespace) -> int:
    """Run torchrun (returning its exit code) or write/submit the sbatch script."""
    train_args = list(args.train_args)
    if train_args[:1] == ["--"]:
        train_args = train_args[1:]
    if train_args[:1] == ["train"]:
        train_args = train_args[1:]
    if args.slurm:
        nproc = None if args.nproc_per_node in (None, "auto", "gpu") else _positive_int(args.nproc_per_node)
        script = render_sbatch(
            train_args,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            nproc_per_node=nproc,
            partition=args.partition,
            time=args.time,
            job_name=args.job_name,
            output_dir=Path(args.slurm_dir).absolute(),
            cpus_per_task=args.cpus_per_task,
            max_restarts=args.max_restarts,
            setup=args.setup,
        )
        if args.dry_run:
            sys.stdout.write(script)
            return 0
        directory = Path(args.slurm_dir)
        directory.mkdir(parents=True, exist_ok=True)  # sbatch does not create the log directory
        path = directory / f"{args.job_name}.sbatch"
        write_text(path, script)
        if not args.submit:
            sys.stdout.write(script)
            print(f"wrote {path}; submit with: sbatch {shlex.quote(str(path))}", file=sys.stderr)
            return 0
        return subprocess.call(["sbatch", str(path)])
    argv = build_torchrun_argv(
        train_args,
        nproc_per_node=args.nproc_per_node or 1,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        rdzv_endpoint=args.rdzv_endpoint,
        rdzv_id=args.rdzv_id,
        max_restarts=args.max_restarts,
    )
    if args.dry_run:
        print(shlex.join(argv))
        return 0
    return subprocess.call(argv, env=torchrun_env())


def torchrun_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for torchrun: restarts get a fresh rendezvous store each (see restart_safe_store)."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault(SHARED_STORE_ENV, "1")
    return env


def _positive_int(text: str) -> int:
    if not str(text).isdigit() or int(text) < 1:
        raise UsageError(f"--nproc-per-node must be a positive number with --slurm, got {text!r}")
    return int(text)
