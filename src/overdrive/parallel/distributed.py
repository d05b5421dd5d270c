"""Process-group lifecycle: read the launcher's environment, start the group, fail fast, shut down.

Launchers (torchrun, the deepspeed launcher, `srun torchrun`) all export RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; that is the only contract relied on here. The backend follows the device: gloo on
CPU, NCCL for CUDA tensors (with gloo kept for CPU tensors, which checkpointing and offload need).

Collectives get a short timeout (60 s on CPU by default) so that a hung or dead rank turns into an error on
the others instead of a job that waits forever; `guard` turns that error into a one-line message and an exit.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from overdrive.core.dims import ParallelDims
from overdrive.core.runtime import Runtime
from overdrive.parallel.launch import SHARED_STORE_ENV

if TYPE_CHECKING:
    from overdrive.parallel.strategy import Strategy

DEFAULT_TIMEOUT_CPU_S = 60.0
DEFAULT_TIMEOUT_CUDA_S = 600.0  # NCCL: first steps may wait on other ranks' compilation or data loading
TIMEOUT_ENV = "OVERDRIVE_DIST_TIMEOUT"
EXIT_PEER_LOST = 3


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process about its place in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    launched: bool = False  # True when a launcher set RANK/WORLD_SIZE (so MASTER_ADDR/PORT exist)


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Parse torchrun / deepspeed-launcher variables; a plain `python` run is rank 0 of 1."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return LaunchEnv()
    world = int(env["WORLD_SIZE"])
    return LaunchEnv(
        rank=int(env["RANK"]),
        local_rank=int(env.get("LOCAL_RANK", "0")),
        world_size=world,
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))),
        launched=True,
    )


def default_timeout_s(cuda: bool) -> float:
    value = os.environ.get(TIMEOUT_ENV)
    if value:
        return float(value)
    return DEFAULT_TIMEOUT_CUDA_S if cuda else DEFAULT_TIMEOUT_CPU_S


def init_runtime(strategy: Strategy | None = None, timeout_s: float | None = None) -> Runtime:
    """Validate the strategy for this world, then start the process group and the device mesh it needs.

    A strategy with any parallelism gets a process group even on one process (FSDP2, DTensor, DCP and
    DeepSpeed expect one); without a launcher that group lives in an in-memory store, so no port is opened.
    """
    env = launch_env()
    cuda = torch.cuda.is_available()
    dims = ParallelDims()
    if strategy is not None:
        strategy.validate(env.world_size)
        dims = strategy.parallel_dims(env.world_size)
    if cuda:
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    needs_group = env.world_size > 1 or (strategy is not None and strategy.is_distributed)
    mesh = dp_mesh = None
    if needs_group:
        start_process_group(env, device, timeout_s)
        mesh, dp_mesh = dims.build_mesh(device.type)
    return Runtime(
        rank=env.rank,
        local_rank=env.local_rank,
        world_size=env.world_size,
        device=device,
        dims=dims,
        mesh=mesh,
        dp_mesh=dp_mesh,
    )


def start_process_group(env: LaunchEnv, device: torch.device, timeout_s: float | None = None) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    cuda = device.type == "cuda"
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s if timeout_s is not None else default_timeout_s(cuda))
    kwargs = {"device_id": device} if cuda else {}
    if env.launched:
        store = restart_safe_store(env, timeout)
        dist.init_process_group(
            backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout, **kwargs
        )
    else:
        store = dist.HashStore()
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout, **kwargs)


def restart_safe_store(env: LaunchEnv, timeout: datetime.timedelta) -> torch.distributed.Store | None:
    """The store for `init_process_group`, isolated per torchrun restart where torch does not isolate it.

    torchrun shares its rendezvous TCPStore with the workers by default and keeps it across restarts, so after
    `--max-restarts` relaunches the group, a rank can read a dead rank's gloo/NCCL address left by the previous
    attempt and fail with "connection refused". On one node every worker restarts together and sees the same
    TORCHELASTIC_RESTART_COUNT, so prefixing the keys with it isolates the attempts. Across nodes the counts can
    differ, so there the launcher must opt out of sharing (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, which
    `overdrive launch` sets); we warn when it is missing. None = let `init_process_group` use env:// itself.
    """
    import warnings

    import torch.distributed as dist

    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    max_restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if not shared or max_restarts == 0:
        return None
    if env.local_world_size != env.world_size:
        if env.rank == 0:
            warnings.warn(
                f"torchrun --max-restarts {max_restarts} on several nodes shares one rendezvous store across "
                f"restarts, which can make a restart fail to connect; export {SHARED_STORE_ENV}=1 for torchrun "
                "(`overdrive launch` does)",
                stacklevel=2,
            )
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store, _, _ = next(dist.rendezvous("env://", env.rank, env.world_size, timeout=timeout))
    return dist.PrefixStore(f"overdrive/attempt-{attempt}", store)


def backend_name() -> str:
    """The backend DeepSpeed should wrap: the one that serves this process' device."""
    import torch.distributed as dist

    name = str(dist.get_backend())
    return "nccl" if "nccl" in name else "gloo"


FINISHED_KEY = "overdrive/finished"
FINISH_WAIT = datetime.timedelta(hours=6)  # rank 0 may still be exporting and sampling a large model


def leave_together(runtime: Runtime) -> None:
    """After a good run, the other ranks wait until rank 0 is done before tearing their groups down.

    Rank 0 writes the export and the sample alone after the last collective; a rank that destroys its gloo
    groups meanwhile was seen to abort (SIGABRT, "terminate called without an active exception"). The wait
    goes through the rendezvous store, not a collective, so it has no process-group timeout; if rank 0 dies
    instead, the launcher ends this rank.
    """
    import torch.distributed as dist

    if runtime.world_size == 1 or not dist.is_initialized():
        return
    store = dist.distributed_c10d._get_default_store()
    if runtime.is_main:
        store.set(FINISHED_KEY, "1")
    else:
        store.wait([FINISHED_KEY], FINISH_WAIT)


def shutdown() -> None:
    """Destroy the process group; without it some backends abort the process at exit after a good run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


PEER_FAILURE_MESSAGES = re.compile(
    "|".join(
        (
            r"gloo/transport/",  # raised in gloo's transport layer (pair.cc, unbound_buffer.cc...)
            r"connection (?:closed|reset) by peer",
            r"timed out waiting \d+ ?ms for (?:recv|send) operation",
            r"application timeout caused pair closure",
            r"nccl communicator was aborted",
            r"watchdog caught collective operation timeout",
        )
    ),
    re.IGNORECASE,
)


def is_peer_failure(exc: BaseException) -> bool:
    """Whether an exception means another rank died or hung (as opposed to a bug on this rank)."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and PEER_FAILURE_MESSAGES.search(str(exc)) is not None


@contextlib.contextmanager
def guard(runtime: Runtime) -> Iterator[None]:
    """Turn a lost peer into a one-line message and an immediate exit (code 3).

    Exiting with os._exit skips atexit/destroy handlers that would otherwise block on the dead peer.
    """
    try:
        yield
    except Exception as exc:
        if runtime.world_size > 1 and is_peer_failure(exc):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            sys.stderr.write(
                f"overdrive: rank {runtime.rank}/{runtime.world_size}: lost contact with another rank "
                f"({first[:200]}); exiting\n"
            )
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(EXIT_PEER_LOST)
        raise
