"""The tune cache: one JSON file per (model shape, sequence, global batch, world, device, versions) key.

`overdrive tune` stores its measured winner here; `--strategy auto` reads it. The key covers the versions of
overdrive, torch and transformers because a kernel or compiler change can move the fastest strategy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

from overdrive import __version__
from overdrive.atomic import write_json

_KEY_SCHEMA = 1


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return {"overdrive": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _cpu_name() -> str:
    """The CPU model and core count: two CPUs called "cpu" are different machines."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu:{name}:{os.cpu_count()}"


def tune_key(model_shape_dict: dict, seq: int, global_batch: int, world: int, device: str) -> str:
    """A stable hash of everything that decides which strategy is fastest (dict order does not matter).

    `device` is the device-table row (overdrive.search.hardware); "cpu" is refined to this CPU's model and
    core count, so a cache copied to another machine is not trusted there.
    """
    if device == "cpu":
        device = _cpu_name()
    payload = {
        "schema": _KEY_SCHEMA,
        "shape": model_shape_dict,
        "seq": int(seq),
        "global_batch": int(global_batch),
        "world": int(world),
        "device": str(device),
        "versions": _versions(),
    }
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def shape_dict(cfg: Any) -> dict[str, Any]:
    """The ModelShape of a TrainConfig's model as a dict: the `model_shape_dict` of `tune_key`.

    tune and `--strategy auto` both call this, so they derive the same key. From scratch the vocabulary is
    the --tokenizer's length when one is given, else --vocab-size (the BPE train builds); a pretrained model
    keeps its config's vocabulary. Nothing but configs (and a tokenizer's vocabulary) is read.
    """
    return dataclasses.asdict(model_shape(cfg))


def model_shape(cfg: Any) -> Any:
    """overdrive.search.shape.ModelShape of `cfg.model` / `cfg.model_config` (default tiny)."""
    from overdrive.modeling import preset_config
    from overdrive.search.shape import ModelShape

    if cfg.model:
        if Path(cfg.model).is_dir():
            config = preset_config(cfg.model)
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(
                cfg.model, cache_dir=cfg.cache_dir, trust_remote_code=cfg.trust_remote_code
            )
        return ModelShape.from_config(config)
    config = preset_config(cfg.model_config or "tiny")
    if cfg.tokenizer:
        from overdrive.data.tokenizer import load_tokenizer

        config.vocab_size = len(load_tokenizer(cfg.tokenizer, cfg.trust_remote_code, cache_dir=cfg.cache_dir))
    else:
        config.vocab_size = cfg.vocab_size
    return ModelShape.from_config(config)


def key_for_config(cfg: Any, world: int, device: str) -> str:
    """`tune_key` of a TrainConfig on `world` ranks of `device` (the sequence is --block-size)."""
    return tune_key(shape_dict(cfg), cfg.block_size, cfg.global_batch_size, world, device)


def cache_dir() -> Path:
    """$OVERDRIVE_CACHE_DIR, else ~/.cache/overdrive (created on first store, not here)."""
    env = os.environ.get("OVERDRIVE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "overdrive"


def _path(key: str) -> Path:
    if not key or not all(c.isalnum() or c in "-_" for c in key):
        raise ValueError(f"bad tune cache key {key!r}")
    return cache_dir() / "tune" / f"{key}.json"


def load_tuned(key: str) -> dict[str, Any] | None:
    """The stored tune result for `key`, or None when there is none or it is unreadable (a stale cache is
    never an error: the caller falls back to the plan)."""
    path = _path(key)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("strategy"), dict):
        return None
    return data


def store_tuned(key: str, result: dict[str, Any]) -> Path:
    """Write the result atomically (a concurrent reader sees the old file or the new one); returns its path."""
    for field in ("strategy", "precision", "micro_batch_size", "tokens_per_sec"):
        if field not in result:
            raise ValueError(f"tune result lacks {field!r}")
    path = _path(key)
    write_json(path, {**result, "key": key})
    return path
