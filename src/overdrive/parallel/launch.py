"""`overdrive launch`: start `overdrive train` on several processes/nodes through torchrun, or render SLURM.

This is deliberately thin: torchrun does rendezvous, restarts and failure propagation; we only build its
argument list (so users need not remember it) and, for clusters, an sbatch script that runs one torchrun
agent per node with the first node of the allocation as the c10d rendezvous host.

Everything the user typed is checked here, before torchrun starts (also under --dry-run): the launch flags,
and the train flags with the same parser `overdrive train` uses. torchrun's agent then runs in this process,
so that when the processes fail we know their exit codes: a usage error on every rank exits 2 with the ranks'
own one line, instead of torchrun's ChildFailedError traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from overdrive.atomic import write_text
from overdrive.errors import OverdriveError, UsageError

DEFAULT_PORT = 29500
# torchrun keeps one rendezvous store across --max-restarts attempts unless this is set; stale keys of the
# previous attempt then break the restarted process group (see distributed.restart_safe_store).
SHARED_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
# Words torchrun's --nproc-per-node resolves on the node itself (torch.distributed.run.determine_local_world_size).
NPROC_WORDS = ("auto", "cpu", "gpu", "xpu")
_COUNT = re.compile(r"[0-9]+")
_NNODES = re.compile(r"([0-9]+)(?::([0-9]+))?")
_ENDPOINT = re.compile(r"[^\s:]+(?::([0-9]+))?")


# ------------------------------------------------------------------------------------- checking the flags
def check_nproc_per_node(value: int | str) -> int | str:
    """A positive count, or one of the words torchrun resolves itself (auto, cpu, gpu, xpu)."""
    text = str(value)
    if text in NPROC_WORDS:
        return text
    if _COUNT.fullmatch(text) and int(text) >= 1:
        return int(text)
    raise UsageError(
        f"--nproc-per-node must be a positive number or one of {', '.join(NPROC_WORDS)}, got {text!r}"
    )


def check_nnodes(value: int | str) -> tuple[int, int]:
    """(min, max) nodes from N or MIN:MAX (an elastic range), both at least 1."""
    text = str(value)
    match = _NNODES.fullmatch(text)
    if not match:
        raise UsageError(f"--nnodes must be a positive number or MIN:MAX (elastic), got {text!r}")
    low, high = int(match[1]), int(match[2] or match[1])
    if not 1 <= low <= high:
        raise UsageError(f"--nnodes needs 1 <= MIN <= MAX nodes, got {text!r}")
    return low, high


def check_rendezvous(
    endpoint: str | None, rdzv_id: str | None, node_rank: int | None, max_nodes: int
) -> None:
    """HOST[:PORT] with a real port, an id without blanks, and a node rank inside the node count."""
    if endpoint is not None:
        match = _ENDPOINT.fullmatch(endpoint)
        if not match or (match[1] is not None and not 1 <= int(match[1]) <= 65535):
            raise UsageError(f"--rdzv-endpoint must look like HOST:PORT (port 1-65535), got {endpoint!r}")
    if rdzv_id is not None and (not rdzv_id or any(c.isspace() for c in rdzv_id)):
        raise UsageError(f"--rdzv-id must be a non-empty word shared by all nodes, got {rdzv_id!r}")
    if node_rank is not None and not 0 <= node_rank < max_nodes:
        raise UsageError(
            f"--node-rank must be in 0..{max_nodes - 1} for --nnodes {max_nodes}, got {node_rank}"
        )


def check_train_args(train_args: Sequence[str]) -> None:
    """Parse the train flags with `overdrive train`'s own parser: a typo fails here once, not on every rank."""
    from overdrive.cli import build_parser

    build_parser().parse_args(["train", *train_args])


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
    nproc_per_node = check_nproc_per_node(nproc_per_node)
    _, max_nodes = check_nnodes(nnodes)
    if max_nodes > 1 and not rdzv_endpoint:
        raise UsageError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (a host every node can reach)")
    check_rendezvous(rdzv_endpoint, rdzv_id, node_rank, max_nodes)
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
            "--gpus-per-node must not be negative and --nproc-per-node must be positive; with 0 GPUs pass "
            "--nproc-per-node (CPU processes)"
        )
    if not _NAME.fullmatch(job_name):
        raise UsageError(f"--job-name may use letters, digits, '_', '.', '-' only, got {job_name!r}")
    if not _TIME.fullmatch(time):
        raise UsageError(f"--time must be a SLURM time such as 04:00:00 or 1-12:00:00, got {time!r}")
    if partition is not None and not _NAME.fullmatch(partition):
        raise UsageError(f"--partition must be a partition name, got {partition!r}")
    if not 1 <= port <= 65535:
        raise UsageError(f"--port must be a TCP port, got {port}")
    if cpus_per_task is not None and cpus_per_task < 1:
        raise UsageError(f"--cpus-per-task must be at least 1, got {cpus_per_task}")
    if max_restarts < 0:
        raise UsageError(f"--max-restarts must not be negative, got {max_restarts}")
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
        "# first line of the node list, cut in bash: piping into `head -n 1` can kill scontrol with SIGPIPE,",
        "# which pipefail turns into exit 141",
        'node_list=$(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        "head_node=${node_list%%$'\\n'*}",
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
    """Check every flag, then run torchrun (returning the processes' exit code) or write/submit the script."""
    train_args = list(args.train_args)
    if train_args[:1] == ["--"]:
        train_args = train_args[1:]
    if train_args[:1] == ["train"]:
        train_args = train_args[1:]
    check_flag_combinations(args)
    if args.slurm:
        return run_slurm(args, train_args)
    argv = build_torchrun_argv(
        train_args,
        nproc_per_node=1 if args.nproc_per_node is None else args.nproc_per_node,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        rdzv_endpoint=args.rdzv_endpoint,
        rdzv_id=args.rdzv_id,
        max_restarts=args.max_restarts,
    )
    check_train_args(train_args)
    if args.dry_run:
        print(shlex.join(argv))
        return 0
    check_local_devices(argv[argv.index("--nproc-per-node") + 1])
    return run_torchrun(argv[3:])  # without `python -m torch.distributed.run`


def check_flag_combinations(args: argparse.Namespace) -> None:
    """Flags of the other mode would be silently ignored: say which flag to use instead."""
    if args.slurm:
        given = [
            flag
            for flag, value in (
                ("--nnodes", args.nnodes != "1"),
                ("--node-rank", args.node_rank is not None),
                ("--rdzv-endpoint", args.rdzv_endpoint is not None),
                ("--rdzv-id", args.rdzv_id is not None),
            )
            if value
        ]
        if given:
            raise UsageError(
                f"{given[0]} applies to torchrun launches, not --slurm; use --nodes (the script finds the "
                "rendezvous host itself)"
            )
    elif args.submit or args.setup:
        flag = "--submit" if args.submit else "--setup"
        raise UsageError(f"{flag} applies to --slurm only; add --slurm to write an sbatch script")


def run_slurm(args: argparse.Namespace, train_args: list[str]) -> int:
    """Render the sbatch script; print it (--dry-run), write it, or write and submit it."""
    script = render_sbatch(
        train_args,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        nproc_per_node=slurm_nproc(args.nproc_per_node),
        partition=args.partition,
        time=args.time,
        job_name=args.job_name,
        output_dir=Path(args.slurm_dir).absolute(),
        cpus_per_task=args.cpus_per_task,
        max_restarts=args.max_restarts,
        setup=args.setup,
    )
    check_train_args(train_args)
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    if args.submit and shutil.which("sbatch") is None:
        raise UsageError(
            "--submit needs sbatch, which is not on PATH here; drop --submit and submit the script "
            "from a SLURM login node"
        )
    directory = Path(args.slurm_dir)
    directory.mkdir(parents=True, exist_ok=True)  # sbatch does not create the log directory
    path = directory / f"{args.job_name}.sbatch"
    write_text(path, script)
    if not args.submit:
        sys.stdout.write(script)
        print(f"wrote {path}; submit with: sbatch {shlex.quote(str(path))}", file=sys.stderr)
        return 0
    return subprocess.call(["sbatch", str(path)])


def slurm_nproc(value: str | None) -> int | None:
    """Processes per node in the script: a number, or None (auto/gpu) for one per GPU of --gpus-per-node."""
    if value is None:
        return None
    checked = check_nproc_per_node(value)
    if checked in ("auto", "gpu"):
        return None
    if isinstance(checked, str):
        raise UsageError(
            f"--nproc-per-node {checked} cannot be used with --slurm; pass a number of processes"
        )
    return checked


def check_local_devices(nproc_per_node: str) -> None:
    """`gpu`/`xpu` count this machine's devices: without any, torchrun would fail with a traceback."""
    if nproc_per_node not in ("gpu", "xpu"):
        return
    import torch

    backend = torch.cuda if nproc_per_node == "gpu" else getattr(torch, "xpu", None)
    if backend is None or not backend.is_available():
        kind = "CUDA GPU" if nproc_per_node == "gpu" else "XPU"
        raise UsageError(
            f"--nproc-per-node {nproc_per_node} needs a {kind} on this machine and found none; pass a number "
            "of processes (or cpu)"
        )


# ------------------------------------------------------------------------------------------ running torchrun
class ProcessesFailed(OverdriveError):
    """Processes started by torchrun failed for a reason other than a usage error; exit with their code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run_torchrun(torchrun_args: Sequence[str]) -> int:
    """torchrun's agent in this process, so that the processes' exit codes come back instead of a traceback.

    0 when every process succeeded; 2, with nothing added, when the processes stopped on a usage error (each
    printed its own one line); otherwise ProcessesFailed naming each failed rank.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    with _torchrun_process_state(), _quiet_failure_logs():
        try:
            run(parse_args(list(torchrun_args)))
        except ChildFailedError as exc:
            return failure_exit_code(exc.failures)
        except SignalException as exc:
            print(f"overdrive: interrupted ({exc.sigval.name}); the processes were stopped", file=sys.stderr)
            return 128 + int(exc.sigval)
        except Exception as exc:  # rendezvous or ports: the group never ran
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise OverdriveError(
                f"torchrun could not run the processes ({type(exc).__name__}: {first}); check --rdzv-endpoint "
                "and that every node was started"
            ) from exc
    return 0


def failure_exit_code(failures: Mapping[int, Any]) -> int:
    """Exit code for torchrun's failed processes (rank -> ProcessFailure with `exitcode`).

    Ranks that torchrun itself stopped with SIGTERM after the first failure are not causes. When the causes
    all exited 2 (a UsageError on each rank) the code is 2 and their own lines are all the user needs.
    """
    causes = {rank: f.exitcode for rank, f in failures.items() if f.exitcode != -signal.SIGTERM}
    causes = causes or {rank: f.exitcode for rank, f in failures.items()}
    codes = {code if code > 0 else 128 - code for code in causes.values()}
    if codes == {UsageError.exit_code}:
        return UsageError.exit_code
    described = [f"rank {rank} {_describe_exit(code)}" for rank, code in sorted(causes.items())]
    more = f" and {len(described) - 4} more" if len(described) > 4 else ""
    raise ProcessesFailed(
        f"{', '.join(described[:4])}{more} (see their output above)",
        codes.pop() if len(codes) == 1 else 1,
    )


def _describe_exit(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


_TORCHRUN_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")  # torchrun's agent installs handlers for these
# torchrun's own lines about a failure; ours replaces them (found in torch.distributed.elastic.multiprocessing.api)
_TORCHRUN_NOISE = ("failed (exitcode", "Sending process")


@contextlib.contextmanager
def _torchrun_process_state() -> Iterator[None]:
    """torchrun's environment (torchrun_env) while it runs; this process' environment and handlers after."""
    saved_env = dict(os.environ)
    signals = [getattr(signal, name) for name in _TORCHRUN_SIGNALS if hasattr(signal, name)]
    saved_handlers = {sig: signal.getsignal(sig) for sig in signals}
    os.environ.update(torchrun_env())
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        with contextlib.suppress(ValueError):  # not the main thread: nothing was installed
            for sig, handler in saved_handlers.items():
                signal.signal(sig, handler)


class _DropFailureNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_TORCHRUN_NOISE)


@contextlib.contextmanager
def _quiet_failure_logs() -> Iterator[None]:
    logger = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    noise = _DropFailureNoise()
    logger.addFilter(noise)
    try:
        yield
    finally:
        logger.removeFilter(noise)


def torchrun_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for torchrun: restarts get a fresh rendezvous store each (see restart_safe_store)."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault(SHARED_STORE_ENV, "1")
    return env
