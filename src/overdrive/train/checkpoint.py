"""Training checkpoints: `OUTPUT/checkpoints/step-NNNNNNN/`, written atomically.

Every rank writes its engine state into a shared staging directory `.step-NNNNNNN.tmp`; after a barrier rank 0
writes `trainer_state.json` (the marker of a complete checkpoint) and renames the directory into place. A crash
at any point leaves either the previous checkpoints or a `.tmp` directory that is never picked up.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from overdrive.atomic import write_json
from overdrive.errors import UsageError
from overdrive.train.engine import TrainEngine

STATE_FILE = "trainer_state.json"
NAME = re.compile(r"^step-(\d{7})$")


def checkpoints_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)))


def resolve_resume(resume: str, output_dir: Path | None) -> Path:
    """'latest' or a path -> a checkpoint directory that passed a completeness check."""
    if resume == "latest":
        if output_dir is None:
            raise UsageError("--resume latest needs --output-dir (the run to continue)")
        found = list_checkpoints(output_dir)
        if not found:
            raise UsageError(
                f"no checkpoint found under {checkpoints_root(output_dir)}; drop --resume or fix the path"
            )
        path = found[-1]
    else:
        path = Path(resume)
        if not path.is_dir():
            raise UsageError(f"checkpoint {resume} does not exist; pass a checkpoint directory or 'latest'")
    read_state(path)  # raises on a corrupt checkpoint
    return path


def read_state(path: Path) -> dict[str, Any]:
    state_file = path / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(
            f"checkpoint {path} is incomplete or corrupt (bad {STATE_FILE}); resume from an earlier one"
        ) from None
    return state


def run_dir_of(checkpoint: Path) -> Path:
    """OUTPUT for OUTPUT/checkpoints/step-N."""
    return checkpoint.parent.parent


def save(
    engine: TrainEngine,
    output_dir: Path,
    step: int,
    state: dict[str, Any],
    keep: int | None,
) -> Path:
    runtime = engine.runtime
    root = checkpoints_root(output_dir)
    final = root / f"step-{step:07d}"
    staging = root / f".{final.name}.tmp"
    if runtime.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    runtime.barrier()
    engine.save_checkpoint(staging)
    torch.save(rng_state(), staging / f"rng-rank{runtime.rank}.pt")
    runtime.barrier()
    if runtime.is_main:
        write_json(staging / STATE_FILE, {**state, "step": step, "world_size": runtime.world_size})
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        rotate(output_dir, keep)
    runtime.barrier()
    return final


def load(engine: TrainEngine, path: Path) -> dict[str, Any]:
    state = read_state(path)
    try:
        engine.load_checkpoint(path)
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"checkpoint {path} could not be loaded ({first}); resume from an earlier one"
        ) from None
    rng_file = path / f"rng-rank{engine.runtime.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def rotate(output_dir: Path, keep: int | None) -> None:
    if keep is None or keep <= 0:
        return
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
