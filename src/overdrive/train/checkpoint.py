"""Where the run keeps its checkpoints and how it finds one to resume from.

The writing itself (atomic, every rank, DCP/DeepSpeed/local formats) is `overdrive.parallel.checkpoint`;
this module adds the run's layout `OUTPUT/checkpoints/step-NNNNNNN/`, `--resume latest|PATH` and rotation.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path
from typing import Any

from overdrive.core.engine import TrainEngine
from overdrive.errors import UsageError
from overdrive.parallel.checkpoint import (
    PREFIX,
    capture_rng_state,
    is_complete,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    remove_checkpoint,
    remove_leftovers,
    restore_rng_state,
    save_checkpoint,
)
from overdrive.parallel.distributed import is_peer_failure


def checkpoints_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def step_of(path: Path) -> int | None:
    suffix = path.name[len(PREFIX) :]
    return int(suffix) if path.name.startswith(PREFIX) and suffix.isdigit() else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (every file of the manifest present), oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if step_of(p) is not None and is_complete(p)]
    return sorted(found, key=lambda p: step_of(p) or 0)


def resolve_resume(resume: str, output_dir: Path | None) -> Path:
    """'latest' or a path -> a complete checkpoint directory (UsageError naming the fix otherwise)."""
    if resume == "latest":
        if output_dir is None:
            raise UsageError("--resume latest needs --output-dir (the run to continue)")
        path = latest_checkpoint(checkpoints_root(output_dir))
        if path is None:
            raise UsageError(
                f"no complete checkpoint under {checkpoints_root(output_dir)}; drop --resume or fix the path"
            )
        warn_skipped_newer(path)
    else:
        path = Path(resume)
        if not path.is_dir():
            raise UsageError(f"checkpoint {resume} does not exist; pass a checkpoint directory or 'latest'")
    read_meta(path)  # marker readable and every file of its manifest there
    try:
        extra = json.loads((path / "extra" / "rank_0.json").read_text())
        int(extra["step"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(
            f"checkpoint {path} has no readable extra/rank_0.json (step and data position); it is corrupt: "
            "use another checkpoint"
        ) from None
    return path


def warn_skipped_newer(chosen: Path) -> None:
    """Say so when `latest` passes over newer checkpoint directories that are incomplete."""
    chosen_step = step_of(chosen) or 0
    for other in sorted(chosen.parent.iterdir()):
        step = step_of(other)
        if step is not None and step > chosen_step and not is_complete(other):
            print(f"overdrive: warning: skipping incomplete checkpoint {other}", file=sys.stderr)


def run_dir_of(checkpoint: Path) -> Path:
    """OUTPUT for OUTPUT/checkpoints/step-N."""
    return checkpoint.parent.parent


def save(engine: TrainEngine, output_dir: Path, step: int, state: dict[str, Any], keep: int | None) -> Path:
    """Checkpoint at `step` (every rank calls), then drop the oldest beyond `keep`."""
    extra = {**state, "step": step, "rng": capture_rng_state()}
    path = save_checkpoint(engine, checkpoints_root(output_dir) / f"{PREFIX}{step:07d}", extra)
    if engine.runtime.is_main:
        remove_leftovers(checkpoints_root(output_dir))
        if keep:
            for old in list_checkpoints(output_dir)[:-keep]:
                remove_checkpoint(old)
    engine.runtime.barrier()
    return path


def load(engine: TrainEngine, path: Path) -> dict[str, Any]:
    """Restore engine state; RNG streams come back only on the world size they were saved on."""
    try:
        resumed = load_checkpoint(engine, path)
    except UsageError:
        raise
    except Exception as exc:  # safetensors, pickle and torch each raise their own kinds for bad files
        if engine.runtime.world_size > 1 and is_peer_failure(exc):
            raise  # a lost rank, not a bad file: `guard` reports it
        raise UsageError(describe_load_failure(path, exc)) from None
    if resumed.same_world and "rng" in resumed.extra:
        restore_rng_state(resumed.extra["rng"])
    return resumed.extra


def describe_load_failure(path: Path, exc: BaseException) -> str:
    """One line naming why a checkpoint did not load and the fix that fits that cause."""
    text = str(exc).strip()
    first = text.splitlines()[0][:200] if text else type(exc).__name__
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in text or "Unsupported global" in text:
        return (
            f"checkpoint {path} holds objects that are not plain tensors and was not loaded (refused by "
            "weights-only loading); it may be tampered with: use a checkpoint you trust"
        )
    if "size mismatch" in text or ("shape" in text.lower() and "mismatch" in text.lower()):
        return (
            f"checkpoint {path} was written for a different model ({first}); resume with the model config "
            "and tokenizer it was written with, or start a new run"
        )
    return (
        f"checkpoint {path} could not be loaded ({type(exc).__name__}: {first}); it is corrupt: use another"
    )
