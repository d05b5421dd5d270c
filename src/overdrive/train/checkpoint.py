"""Where the run keeps its checkpoints and how it finds one to resume from.

The writing itself (atomic, every rank, DCP/DeepSpeed/local formats) is `overdrive.parallel.checkpoint`;
this module adds the run's layout `OUTPUT/checkpoints/step-NNNNNNN/`, `--resume latest|PATH` and rotation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from overdrive.errors import UsageError
from overdrive.parallel.checkpoint import (
    MARKER,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from overdrive.train.engine import TrainEngine

PREFIX = "step-"


def checkpoints_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def resolve_resume(resume: str, output_dir: Path | None) -> Path:
    """'latest' or a path -> a checkpoint directory whose completion marker is readable."""
    if resume == "latest":
        if output_dir is None:
            raise UsageError("--resume latest needs --output-dir (the run to continue)")
        path = latest_checkpoint(checkpoints_root(output_dir), prefix=PREFIX)
        if path is None:
            raise UsageError(
                f"no checkpoint found under {checkpoints_root(output_dir)}; drop --resume or fix the path"
            )
    else:
        path = Path(resume)
        if not path.is_dir():
            raise UsageError(f"checkpoint {resume} does not exist; pass a checkpoint directory or 'latest'")
    try:
        meta = json.loads((path / MARKER).read_text())
        int(meta["world_size"])
        extra = json.loads((path / "extra" / "rank_0.json").read_text())
        int(extra["step"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"checkpoint {path} is incomplete or corrupt; resume from an earlier one") from None
    return path


def run_dir_of(checkpoint: Path) -> Path:
    """OUTPUT for OUTPUT/checkpoints/step-N."""
    return checkpoint.parent.parent


def save(engine: TrainEngine, output_dir: Path, step: int, state: dict[str, Any], keep: int | None) -> Path:
    """Checkpoint at `step` (every rank calls), then drop the oldest beyond `keep`."""
    extra = {**state, "step": step, "rng": capture_rng_state()}
    path = save_checkpoint(engine, checkpoints_root(output_dir) / f"{PREFIX}{step:07d}", extra)
    if engine.runtime.is_main and keep:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    engine.runtime.barrier()
    return path


def load(engine: TrainEngine, path: Path) -> dict[str, Any]:
    """Restore engine state; RNG streams come back only on the world size they were saved on."""
    try:
        resumed = load_checkpoint(engine, path)
    except UsageError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"checkpoint {path} could not be loaded ({first}); resume from an earlier one"
        ) from None
    if resumed.same_world and "rng" in resumed.extra:
        restore_rng_state(resumed.extra["rng"])
    return resumed.extra
