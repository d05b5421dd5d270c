"""Reading DCP checkpoints without running code from them.

torch's `FileSystemReader.read_metadata` unpickles `dcp/.metadata` with plain `pickle.load`, so a crafted file
runs arbitrary code on `--resume` or `overdrive export`. `SafeFileSystemReader` reads it through an unpickler
that resolves only the classes a DCP metadata file is made of (the dataclasses and enums of
`torch.distributed.checkpoint.metadata`, torch dtypes and sizes, paths); anything else is refused. The tensor
data files are already read with `torch.load(weights_only=True)` by torch itself.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from overdrive.errors import UsageError

_PATH_CLASSES = {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}


def _allowed(module: str, name: str) -> Any | None:
    """The object `module.name` if a DCP metadata file may reference it, else None."""
    import pathlib

    import torch.distributed.checkpoint.filesystem as dcp_fs
    import torch.distributed.checkpoint.metadata as dcp_meta

    if module == "torch.distributed.checkpoint.metadata":
        obj = getattr(dcp_meta, name, None)
        return obj if isinstance(obj, type) and obj.__module__ == dcp_meta.__name__ else None
    if module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo":
        return dcp_fs._StorageInfo
    if module == "torch":
        obj = getattr(torch, name, None)
        return obj if obj is torch.Size or isinstance(obj, torch.dtype | torch.memory_format) else None
    if module == "torch.serialization" and name == "_get_layout":
        return torch.serialization._get_layout  # maps a layout name to a torch.layout
    if module == "pathlib" and name in _PATH_CLASSES:
        return getattr(pathlib, name)
    return None


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed(module, name)
        if obj is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata")
        return obj


def load_metadata(data: bytes, source: str) -> Metadata:
    """Unpickle DCP metadata bytes, refusing any other object with a one-line UsageError."""
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError) as exc:
        raise UsageError(
            f"{source} is not a valid DCP metadata file and was not loaded ({exc}); it may be corrupt or "
            "tampered with: resume from another checkpoint"
        ) from None
    if not isinstance(metadata, Metadata):
        raise UsageError(f"{source} does not hold DCP metadata; resume from another checkpoint")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata is read by `load_metadata` instead of `pickle.load`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = load_metadata(stream.read(), str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
