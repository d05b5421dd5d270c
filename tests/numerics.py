"""Error measures shared by the kernel and patch tests."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import pytest
import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of ``a`` w.r.t. ``b`` (fp64)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def no_worse_than_hf(ours: torch.Tensor, hf: torch.Tensor, truth: torch.Tensor) -> bool:
    """Low-precision acceptance: ours is at most 1.25x (+1e-4) as far from the fp64 truth as HF's own
    low-precision result. bf16 keeps 8 mantissa bits (relative rounding ~4e-3 per op), so a fixed
    tolerance between two bf16 implementations that round at different points would be arbitrary;
    this criterion instead catches any real error while allowing better-than-HF rounding."""
    return rel(ours, truth) <= 1.25 * rel(hf, truth) + 1e-4


def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs (minus ``exclude``)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(v for k, v in seen.items() if k not in skip)


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Run tiny-model tests single-threaded (import into a directory's conftest to apply it there).

    The test models are far too small to gain from intra-op parallelism, and on a shared/overloaded
    CPU a 2-thread OpenMP pool loses most of its time in barrier waits (measured: 5x slower suite).
    The previous thread count is restored after each test, so other test directories are unaffected.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
