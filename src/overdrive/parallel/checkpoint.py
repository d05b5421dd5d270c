"""Checkpoints that survive crashes and world-size changes, plus the HF export.

Layout of a checkpoint directory (on a filesystem every rank can reach):

    overdrive-checkpoint.json   written last: format, world size, strategy and a manifest of every file
                                with its size; complete only while every listed file is there at that size
    dcp/                        torch.distributed.checkpoint: model + optimizer, keyed by parameter name
    trainer_state.pt            scheduler (+ grad scaler) state, rank 0, read with weights_only=True
    deepspeed/                  instead of dcp/ for the DeepSpeed engine (its own format)
    model.safetensors, optimizer.pt   instead of dcp/ for the single-process LocalEngine
    extra/rank_<r>.json         the loop's small per-rank state (step, data position, RNG)
    hf/config.json              the model config, so `export_hf` can write a loadable HF directory

Atomicity: every rank writes into the hidden sibling `.<name>.partial`; after a barrier rank 0 writes the
marker and renames the directory into place. A crash at any point leaves either the previous checkpoint or a
`.partial` directory that `latest_checkpoint` ignores and the next save removes. Deleting a checkpoint first
renames it to a hidden `.trash` name (atomic), so a crash mid-delete never leaves a marked, half-deleted one.

DCP stores each tensor by name with its global shape, so a checkpoint written by FSDP on N ranks loads into
FSDP on M ranks, into DDP, or into the single-process LocalEngine; the planner reshards on load.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from overdrive.core.runtime import Runtime
from overdrive.errors import UsageError
from overdrive.parallel.safe_dcp import SafeFileSystemReader

MARKER = "overdrive-checkpoint.json"
FORMAT_VERSION = 3  # 2: the marker lists every file with its size; 3: DCP optimizer state flat per name
PREFIX = "step-"  # OUTPUT/checkpoints/step-NNNNNNN


# ---------------------------------------------------------------- DCP: model + optimizer


def save_dcp(
    model: nn.Module | list[nn.Module],
    optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer],
    scheduler: Any,
    directory: Path,
    runtime: Runtime,
    grad_scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Model and optimizer through DCP (each rank writes its shards); scheduler state from rank 0.

    Several (module, optimizer) pairs — a rank's pipeline stages — go into one state dict: keys are parameter
    names and optimizer state is flattened per name, so any pipeline degree (or none) can load it.
    """
    import torch.distributed.checkpoint as dcp

    model_sd, optim_sd = _merged_state(_pairs(model, optimizer), flat=True)
    with _quiet_single_process():
        dcp.save(
            {"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory / "dcp"), no_dist=_no_dist()
        )
    if runtime.is_main:
        state: dict[str, Any] = {"scheduler": scheduler.state_dict()}
        if grad_scaler is not None:
            state["grad_scaler"] = grad_scaler.state_dict()
        torch.save(state, directory / "trainer_state.pt")


def load_dcp(
    model: nn.Module | list[nn.Module],
    optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer],
    scheduler: Any,
    directory: Path,
    grad_scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Load into the current sharding and pipeline split (whatever layout wrote it); scheduler(s) from
    trainer_state.pt."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    flat = read_meta(directory).get("version", 1) >= 3  # format 2 kept optimizer param_groups as lists
    pairs = _pairs(model, optimizer)
    model_sd, optim_sd = _merged_state(pairs, flat)
    state = {"model": model_sd, "optim": optim_sd}
    reader = SafeFileSystemReader(directory / "dcp")
    reader.read_metadata()  # a refused metadata file stops here with one line, not inside DCP's collectives
    with _quiet_single_process():
        dcp.load(state, storage_reader=reader, no_dist=_no_dist())
    for module, optim in pairs:  # each pair takes its own keys (a tied weight's from the one loaded copy)
        own_model, own_optim = _state_dicts(module, optim, flat)
        set_state_dict(
            module,
            optim,
            model_state_dict={k: state["model"][k] for k in own_model},
            optim_state_dict={k: state["optim"][k] for k in own_optim} if flat else state["optim"],
            options=_options(flat),
        )
    trainer = torch.load(directory / "trainer_state.pt", map_location="cpu", weights_only=True)
    for sched in scheduler if isinstance(scheduler, list) else [scheduler]:
        sched.load_state_dict(trainer["scheduler"])
    if grad_scaler is not None and "grad_scaler" in trainer:
        grad_scaler.load_state_dict(trainer["grad_scaler"])


def _pairs(model: Any, optimizer: Any) -> list[tuple[nn.Module, torch.optim.Optimizer]]:
    models = model if isinstance(model, list) else [model]
    optimizers = optimizer if isinstance(optimizer, list) else [optimizer]
    return list(zip(models, optimizers, strict=True))


def _options(flat: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=flat)


def _state_dicts(module: nn.Module, optim: torch.optim.Optimizer, flat: bool) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(module, optim, options=_options(flat))


def _merged_state(pairs: list[tuple[nn.Module, torch.optim.Optimizer]], flat: bool) -> tuple[dict, dict]:
    """One model and one optimizer state dict for all pairs (flat optimizer keys never collide)."""
    if len(pairs) == 1 or not flat:
        if len(pairs) > 1:
            raise UsageError("a checkpoint in format 2 cannot be loaded into pipeline stages; resume without pp")
        return _state_dicts(*pairs[0], flat)
    model_sd: dict[str, Any] = {}
    optim_sd: dict[str, Any] = {}
    for module, optim in pairs:
        own_model, own_optim = _state_dicts(module, optim, flat)
        for key, value in own_model.items():
            model_sd.setdefault(key, value)
        for key, value in own_optim.items():
            optim_sd.setdefault(key, value)
    return model_sd, optim_sd


def _no_dist() -> bool:
    """DCP without a process group (single process, LocalEngine) reads and writes everything itself."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it 'assumes a single process' when there is no group: that is exactly our intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded weights on CPU, complete on rank 0 (a collective under FSDP: call it on every rank)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not (dist.is_available() and dist.is_initialized()):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


# ---------------------------------------------------------------- atomic save / load


@dataclass
class ResumeState:
    """What `load_checkpoint` hands back to the loop."""

    extra: dict[str, Any]  # this rank's extra state (rank 0's when the world size changed)
    saved_world_size: int
    same_world: bool  # False: per-rank state such as RNG streams does not carry over


def engine_format(engine: Any) -> str:
    return getattr(engine, "checkpoint_format", "local")


def save_checkpoint(engine: Any, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write a complete checkpoint of `engine` into `directory` atomically; call on every rank.

    `extra` is this rank's small JSON-able state (step, data position, RNG from `capture_rng_state`).
    """
    runtime: Runtime = engine.runtime
    final = Path(directory).absolute()
    partial = final.parent / f".{final.name}.partial"
    if runtime.is_main:
        final.parent.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)  # left by a crashed save
        partial.mkdir()
    runtime.barrier()
    engine.save_checkpoint(partial)
    (partial / "extra").mkdir(exist_ok=True)
    _write_json(partial / "extra" / f"rank_{runtime.rank}.json", extra or {})
    runtime.barrier()
    if runtime.is_main:
        config = getattr(engine.unwrapped_model(), "config", None)
        if config is not None and hasattr(config, "to_json_file"):
            (partial / "hf").mkdir(exist_ok=True)
            config.to_json_file(str(partial / "hf" / "config.json"))
            from overdrive.parallel.adapter_outputs import save_adapter_config

            save_adapter_config(engine.unwrapped_model(), partial / "hf")  # LoRA runs: adapter_config.json
        strategy = getattr(engine, "strategy", None)
        meta = {
            "version": FORMAT_VERSION,
            "format": engine_format(engine),
            "engine": type(engine).__name__,
            "world_size": runtime.world_size,
            "strategy": strategy.to_dict() if strategy is not None else None,
            "files": manifest(partial),
        }
        _write_json(partial / MARKER, meta)
        old = final.parent / f".{final.name}.old"
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(partial, final)
        _fsync_dir(final.parent)
        if old.exists():
            shutil.rmtree(old)
    runtime.barrier()
    return final


def manifest(directory: Path) -> dict[str, int]:
    """Relative path -> size of every file under `directory` (the marker excluded)."""
    return {
        str(path.relative_to(directory)): path.stat().st_size
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MARKER
    }


def remove_checkpoint(directory: Path) -> None:
    """Delete a checkpoint so that a crash at any moment leaves it whole or invisible, never half-there."""
    trash = directory.parent / f".{directory.name}.trash"
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(directory, trash)  # atomic: from here on nothing takes it for a checkpoint
    _fsync_dir(directory.parent)
    shutil.rmtree(trash)


def remove_leftovers(root: Path) -> None:
    """Hidden `.partial`/`.old`/`.trash` directories that crashed saves or deletions left behind."""
    if not root.is_dir():
        return
    for child in root.iterdir():
        if child.name.startswith(".") and child.name.endswith((".partial", ".old", ".trash")):
            shutil.rmtree(child, ignore_errors=True)


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The completion marker's content; UsageError when the directory is not a complete checkpoint."""
    path = Path(directory)
    if not (path / MARKER).is_file():
        raise UsageError(not_a_checkpoint(path))
    try:
        meta = json.loads((path / MARKER).read_text())
        int(meta["world_size"]), str(meta["format"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(
            f"checkpoint {path} has an unreadable {MARKER}; it is corrupt: use another checkpoint"
        ) from None
    problem = missing_files(path, meta)
    if problem:
        raise UsageError(f"checkpoint {path} is incomplete ({problem}); use another checkpoint")
    return meta


def not_a_checkpoint(path: Path) -> str:
    """Why `path` is no checkpoint, and what the user probably meant."""
    if (path / "checkpoints").is_dir() or (path / "summary.json").is_file() or (path / "final").is_dir():
        return (
            f"{path} is a run directory, not a checkpoint; pass one of {path}/checkpoints/{PREFIX}N "
            f"(or --resume latest --output-dir {path})"
        )
    return f"{path} is not an overdrive checkpoint (no {MARKER}); pass OUTPUT/checkpoints/{PREFIX}N"


def missing_files(directory: Path, meta: dict[str, Any]) -> str | None:
    """The first file the marker's manifest lists that is absent or has another size, described; else None."""
    files = meta.get("files")
    if files is None:
        return None if meta.get("version", 1) < 2 else "its manifest is missing"
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{name} has {actual} bytes, the manifest says {size}"
    return None


def is_complete(directory: str | Path) -> bool:
    try:
        read_meta(directory)
    except UsageError:
        return False
    return True


def latest_checkpoint(root: str | Path, prefix: str = PREFIX) -> Path | None:
    """The complete `<prefix><step>` directory with the highest step under `root`, or None."""
    best: tuple[int, Path] | None = None
    base = Path(root)
    if not base.is_dir():
        return None
    for child in base.iterdir():
        suffix = child.name[len(prefix) :]
        complete = child.name.startswith(prefix) and suffix.isdigit() and is_complete(child)
        if complete and (best is None or int(suffix) > best[0]):
            best = (int(suffix), child)
    return best[1] if best else None


def load_checkpoint(engine: Any, directory: str | Path) -> ResumeState:
    """Restore model, optimizer and scheduler into `engine` (every rank) and return the loop's extra state.

    DCP checkpoints load on any world size and into DDP/FSDP/LocalEngine alike; DeepSpeed checkpoints need
    the DeepSpeed engine and the same world size.
    """
    runtime: Runtime = engine.runtime
    path = Path(directory)
    meta = read_meta(path)
    saved, wanted = meta["format"], engine_format(engine)
    if saved == wanted:
        if saved == "deepspeed":
            _check_deepspeed_compatible(engine, meta, path)
        engine.load_checkpoint(path)
    elif saved == "dcp" and wanted == "local":
        load_dcp(engine.model, engine.optimizer, engine.scheduler, path, getattr(engine, "scaler", None))
    elif saved == "local" and wanted == "dcp" and hasattr(engine, "optimizer"):  # 1 process -> N ranks
        from overdrive.parallel.local_format import load_local_into

        modules = getattr(engine, "stages", None) or [engine.module]
        optimizers = getattr(engine, "optimizers", None) or [engine.optimizer]
        schedulers = getattr(engine, "schedulers", None) or [engine.scheduler]
        load_local_into(list(zip(modules, optimizers, strict=True)), schedulers, path)
    else:
        raise UsageError(
            f"checkpoint {path} was written by {meta['engine']} ({saved} format) and cannot be loaded by "
            f"{type(engine).__name__}; resume with the strategy it was written with"
        )
    same_world = meta["world_size"] == runtime.world_size
    extra_dir = path / "extra"
    own = extra_dir / f"rank_{runtime.rank}.json"
    source = own if same_world and own.is_file() else extra_dir / "rank_0.json"
    extra = json.loads(source.read_text()) if source.is_file() else {}
    runtime.barrier()
    return ResumeState(extra, meta["world_size"], same_world)


def _check_deepspeed_compatible(engine: Any, meta: dict[str, Any], path: Path) -> None:
    """DeepSpeed's loader asserts (and desynchronises ranks) on a mismatch; say what is wrong instead."""
    if meta["world_size"] != engine.runtime.world_size:
        raise UsageError(
            f"DeepSpeed checkpoint {path} was written on {meta['world_size']} ranks and cannot resume on "
            f"{engine.runtime.world_size}; resume on {meta['world_size']} ranks or use an FSDP strategy"
        )
    saved_stage = (meta.get("strategy") or {}).get("zero_stage") or 0
    if saved_stage != engine.zero_stage:
        raise UsageError(
            f"DeepSpeed checkpoint {path} was written with ZeRO-{saved_stage} and cannot resume with "
            f"ZeRO-{engine.zero_stage}; resume with zero_stage {saved_stage}"
        )


# ---------------------------------------------------------------- HF export


def export_hf(
    checkpoint_dir: str | Path, out_dir: str | Path, merge: bool = False, location: str | Path | None = None
) -> Path:
    """Write `out_dir/model.safetensors` (+ config.json) from any overdrive checkpoint, in one process.

    Only the model tensors are read (not the optimizer), with safetensors / weights_only loading. A LoRA
    checkpoint exports its peft adapter and base, or with `merge` one model with the adapters folded in;
    `location` is where `out_dir` ends up (the adapter config names its base by absolute path).
    """
    from safetensors.torch import save_file

    from overdrive.parallel.adapter_outputs import ADAPTER_CONFIG, export_adapter_checkpoint

    src = Path(checkpoint_dir)
    meta = read_meta(src)
    adapters = (src / "hf" / ADAPTER_CONFIG).is_file()
    if merge and not adapters:
        raise UsageError(f"--merge folds LoRA adapters into the base, and {src} has none; drop --merge")
    if meta["format"] == "dcp":
        weights = _dcp_model_tensors(src / "dcp")
    elif meta["format"] == "deepspeed":
        from overdrive.parallel.deepspeed_engine import deepspeed_fp32_state_dict

        weights = deepspeed_fp32_state_dict(src / "deepspeed")
    else:
        from safetensors.torch import load_file

        weights = load_file(str(src / "model.safetensors"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if adapters:
        export_adapter_checkpoint(weights, src / "hf", out, Path(location or out), merge)
        return out
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = src / "hf" / "config.json"
    if config.is_file():
        shutil.copyfile(config, out / "config.json")
    return out


def _dcp_model_tensors(dcp_dir: Path) -> dict[str, torch.Tensor]:
    """Load just the `model.*` tensors of a DCP checkpoint, allocating them from its metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = SafeFileSystemReader(dcp_dir)
    metadata = reader.read_metadata()
    model: dict[str, torch.Tensor] = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(item, TensorStorageMetadata):
            model[key[len("model.") :]] = torch.empty(item.size, dtype=item.properties.dtype)
    with _quiet_single_process():
        dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    return model


# ---------------------------------------------------------------- RNG state as JSON


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states as JSON-able values for `extra`."""
    version, state, gauss = random.getstate()
    out: dict[str, Any] = {
        "python": [version, list(state), gauss],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        out["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return out


def restore_rng_state(state: dict[str, Any]) -> None:
    if "python" in state:
        version, values, gauss = state["python"]
        random.setstate((version, tuple(values), gauss))
    if "torch" in state:
        torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
