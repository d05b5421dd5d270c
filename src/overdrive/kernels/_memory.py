"""Peak live-tensor memory on any device, CPU included (tests and benchmarks).

Why: ``torch.cuda.max_memory_allocated`` has no CPU counterpart and RSS is blurred by the
allocator's caching. A ``TorchDispatchMode`` sees every tensor produced by an ATen op (forward and
backward, autograd-saved tensors and gradients included); we count each new storage's bytes until
the storage is freed (its Python object is preserved by PyTorch, so a finalizer fires on release).
Scratch memory internal to a single op (e.g. a matmul workspace) is not visible.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveTensorMemory"]


class LiveTensorMemory(TorchDispatchMode):
    """``with LiveTensorMemory() as mem: ...``; then ``mem.peak_bytes`` = peak bytes allocated inside."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak_bytes = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            nbytes = storage.nbytes()
            if key in self._seen or nbytes == 0:
                continue
            if any(
                key == a.untyped_storage().data_ptr()
                for a in tree_flatten((args, kwargs))[0]
                if isinstance(a, torch.Tensor)
            ):
                continue  # in-place / out= / view of an input: nothing new
            self._seen.add(key)
            self.current += nbytes
            self.peak_bytes = max(self.peak_bytes, self.current)
            weakref.finalize(storage, self._release, key, nbytes)
        return out

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20
