"""Hub ids (models, tokenizers, datasets) fail in one line when the hub cannot answer.

Without this, an unreachable hub makes huggingface_hub retry each file for up to a minute, printing a warning
per retry. So before a hub id reaches `from_pretrained`/`load_dataset` we check offline mode and, once per
process, whether the endpoint answers at all.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from overdrive.errors import UsageError

PROBE_TIMEOUT_S = 3.0
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
NOISY_LOGGERS = ("huggingface_hub", "datasets", "fsspec")


def offline_var() -> str | None:
    """The variable that switches the hub off (read now, so a change after import counts), or None."""
    for name in OFFLINE_VARS:
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return name
    return None


@functools.cache
def probe_hub() -> str | None:
    """Why the hub endpoint cannot be reached (None when it answers); one HEAD request per process."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except Exception as exc:  # any transport failure means the real calls would only retry and fail
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"{constants.ENDPOINT} cannot be reached: {reason}"
    return None


def looks_like_hub_id(name: str) -> bool:
    """`name` or `org/name` with the hub's characters: anything else is meant as a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "~", "/")) or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def cached_on_disk(repo_id: str, filenames: tuple[str, ...], repo_type: str = "model") -> bool:
    """Whether any of `filenames` of `repo_id` is in the local hub cache (usable offline)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        with contextlib.suppress(Exception):
            if isinstance(try_to_load_from_cache(repo_id, filename, repo_type=repo_type), str):
                return True
    return False


def require_hub(name: str, flag: str, cached_files: tuple[str, ...] | None) -> None:
    """Fail in one line when `name` (not a local path) needs a hub that is offline or unreachable.

    In offline mode an id whose `cached_files` are in the local hub cache passes (the libraries load it from
    there); None leaves the offline case to the caller, for libraries with caches of their own (datasets).
    """
    if Path(name).exists():
        return
    if not looks_like_hub_id(name):
        raise UsageError(f"{flag} {name} does not exist; pass an existing local path or a hub id (org/name)")
    var = offline_var()
    if var is not None:
        if cached_files is None or cached_on_disk(name, cached_files):
            return
        raise UsageError(
            f"{flag} {name} is not a local path and the hub is offline ({var}=1); "
            f"pass a local directory or unset {var}"
        )
    reason = probe_hub()
    if reason is not None:
        raise UsageError(
            f"{flag} {name} is not a local path and the hub is unreachable ({reason}); pass a local directory, "
            "fix the network, or set HF_HUB_OFFLINE=1 to use what is already in the local cache"
        )


@contextlib.contextmanager
def quiet_logs(level: int = logging.CRITICAL) -> Iterator[None]:
    """Silence the libraries' retry warnings and 'Failed to read' errors: our one line replaces them."""
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, before, strict=True):
            lg.setLevel(old)
