"""The run directory: which one, may this run write there, and holding it exclusively while it does.

Rules (no run's output is ever lost without an explicit flag):
- a new run needs an empty or absent directory, or `--overwrite` (which removes only the files runs write);
- `--resume latest` continues the newest complete checkpoint; with none it starts fresh only in a directory
  holding no run, or one that this same torchrun launch started before a restart;
- one process at a time writes a run directory: rank 0 holds an exclusive `flock` on `.overdrive.lock` from
  its first write to its exit, and a second run into the same directory stops with the holder's pid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import IO

from overdrive.atomic import remove_entries
from overdrive.config import TrainConfig
from overdrive.core.runtime import Runtime
from overdrive.errors import UsageError
from overdrive.tracking import TRACKER_DIRS
from overdrive.train import checkpoint

RUN_ARTIFACTS = (
    "checkpoints",
    "final",
    "tokenizer",
    "metrics.jsonl",
    "summary.json",
    "curves.png",
    "sample.txt",
    "config.yaml",
    "strategy_choice.json",  # overdrive.search.auto
    *TRACKER_DIRS,
)
LOCK_NAME = ".overdrive.lock"


def plan_output(cfg: TrainConfig) -> tuple[Path, Path | None]:
    """Decide the output dir and the checkpoint to resume from, refusing to clobber an existing run."""
    if cfg.resume and cfg.resume != "latest" and cfg.output_dir is None:
        resume_from = checkpoint.resolve_resume(cfg.resume, None)
        output_dir = checkpoint.run_dir_of(resume_from)
        check_writable(output_dir)
        return output_dir, resume_from
    output_dir = (
        Path(cfg.output_dir) if cfg.output_dir else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    )
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"output dir {output_dir} is a file; pass a directory to --output-dir")
    check_writable(output_dir)
    if cfg.resume == "latest":
        if cfg.output_dir is None:
            raise UsageError("--resume latest needs --output-dir (the run to continue)")
        if not checkpoint.list_checkpoints(output_dir):
            check_fresh_start(output_dir, cfg.overwrite)
            return output_dir, None
    if cfg.resume:
        resume_from = checkpoint.resolve_resume(cfg.resume, output_dir)
        if checkpoint.run_dir_of(resume_from).resolve() != output_dir.resolve():
            check_new_run(output_dir, cfg.overwrite)
        return output_dir, resume_from
    check_new_run(output_dir, cfg.overwrite)
    return output_dir, None


def check_new_run(output_dir: Path, overwrite: bool) -> None:
    if not overwrite and output_dir.is_dir() and any(p.name != LOCK_NAME for p in output_dir.iterdir()):
        raise UsageError(
            f"output dir {output_dir} already exists and is not empty; pass --overwrite to replace the run, "
            "--resume latest to continue it, or another --output-dir"
        )


def has_run(output_dir: Path) -> bool:
    return any((output_dir / name).exists() for name in RUN_ARTIFACTS)


def check_fresh_start(output_dir: Path, overwrite: bool) -> None:
    """`--resume latest` without a checkpoint: start fresh only where no run's output would be replaced."""
    if overwrite or not has_run(output_dir) or started_by_this_launch(output_dir):
        return
    raise UsageError(
        f"--resume latest: {output_dir} holds a run with no complete checkpoint to continue; pass --overwrite "
        "to replace it, or another --output-dir"
    )


def launch_id() -> str | None:
    """torchrun's id for this launch (the same across its --max-restarts attempts), None outside torchrun."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or None


def started_by_this_launch(output_dir: Path) -> bool:
    """Whether an earlier attempt of this same torchrun launch wrote the run (so a restart may redo it)."""
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0")
    return restarted and launch_id() is not None and read_holder(output_dir).get("launch_id") == launch_id()


def check_writable(output_dir: Path) -> None:
    """Fail before any set-up work when the run could not write its output (read-only, not a directory)."""
    existing = output_dir
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(
            f"cannot create output dir {output_dir}: {existing} is a file; pass another --output-dir"
        )
    if not os.access(existing, os.W_OK | os.X_OK):  # access(2) also reports a read-only filesystem to root
        reason = "read-only file system" if _read_only_fs(existing) else "permission denied"
        raise UsageError(f"cannot write to {existing} ({reason}); pass a writable --output-dir")


def _read_only_fs(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def clear_run(output_dir: Path) -> None:
    """With --overwrite, remove what an earlier run wrote (and nothing else the user keeps there)."""
    remove_entries(output_dir, RUN_ARTIFACTS)


def read_holder(output_dir: Path) -> dict[str, object]:
    """What the last (or current) writer of the run recorded in the lock file; {} when unreadable."""
    try:
        data = json.loads((output_dir / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def lock_run_dir(output_dir: Path) -> IO[str]:
    """Take the run directory for this process until it exits (or the handle is closed).

    The lock file is never deleted (deleting lock files races); its content names the holder.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    handle = open(output_dir / LOCK_NAME, "a+")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = read_holder(output_dir)
        handle.close()
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
        raise UsageError(
            f"output dir {output_dir} is in use by another overdrive run ({who}); wait for it to finish or "
            "pass another --output-dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "launch_id": launch_id()}))
    handle.flush()
    return handle


@contextlib.contextmanager
def claim_output_dir(
    cfg: TrainConfig, runtime: Runtime, output_dir: Path, resume_from: Path | None
) -> Iterator[None]:
    """Rank 0 locks the output dir and re-checks it under the lock (another run may have written it since
    `plan_output`); every rank gets rank 0's verdict, so all of them stop with the same line or go on."""
    handle, problem = None, None
    if runtime.is_main:
        try:
            handle = lock_run_dir(output_dir)
            again = plan_output(dataclasses.replace(cfg, output_dir=str(output_dir)))
            if again != (output_dir, resume_from):
                raise UsageError(f"output dir {output_dir} changed while this run was starting; run again")
        except UsageError as exc:
            problem = str(exc)
    if runtime.world_size > 1:
        import torch.distributed as dist

        verdict = [problem]
        dist.broadcast_object_list(verdict, src=0)
        problem = verdict[0]
    try:
        if problem:
            raise UsageError(problem)
        yield
    finally:
        if handle is not None:
            handle.close()
