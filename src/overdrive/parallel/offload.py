"""Activation offload: tensors saved for backward wait in host memory instead of device memory.

Autograd keeps every tensor a backward formula needs (layer inputs, matmul inputs, attention outputs) from
forward until backward; for long sequences these dominate device memory. `torch.autograd.graph.save_on_cpu`
moves each of them to the host when it is saved and back when backward needs it (pinned host memory on CUDA so
the copies are fast), trading PCIe traffic for device memory. It is a context around forward *and* backward,
so it rides on the engine's loss-context hook, inside whatever context tensor parallelism already needs there.

On a CPU run the host is the device: nothing moves and nothing is saved (the context still runs, so the same
code path is exercised). Tensors saved inside a checkpointed layer are the checkpoint's business, not offloaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

ContextFactory = Callable[[], contextlib.AbstractContextManager[None]]


def activation_offload(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """`save_on_cpu` for tensors saved on `device`; pinned host buffers only where pinning exists (CUDA)."""
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")


def with_activation_offload(inner: ContextFactory | None, device: torch.device) -> ContextFactory:
    """A context factory that enters `inner` (e.g. tensor parallelism's loss context) and then the offload."""

    @contextlib.contextmanager
    def context() -> Iterator[None]:
        with inner() if inner is not None else contextlib.nullcontext(), activation_offload(device):
            yield

    return context
