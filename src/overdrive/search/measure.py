"""Measured peak memory of one real training step, to hold the memory model to account.

Why live-tensor bytes: on CUDA the allocator's `max_memory_allocated` is the number the model predicts; a CPU
has no such counter and its RSS is blurred by the allocator's caches and by Python and library code. Here
every tensor the step creates is counted until its storage is freed (`LiveTensorMemory`, a dispatch mode),
from model materialization on, so parameters, gradients, optimizer state, saved activations and temporaries
all count, on any engine (FSDP2 and DeepSpeed included). The process's peak RSS is reported beside it.

The step is the training loop's: `engine.forward_backward(micro_batches, num_items)` then `engine.step(1.0)`.
The first step creates the optimizer state; the second (the steady state) is the one measured.
"""

from __future__ import annotations

import resource
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

from overdrive.parallel.strategy import Strategy


class LiveStorageBytes(TorchDispatchMode):
    """Peak of the summed sizes of every storage an op created, read after every op.

    Unlike counting bytes at creation (overdrive.kernels._memory), the sizes are re-read, so storages that
    FSDP2 frees and re-allocates in place (`untyped_storage().resize_`) count only while they hold memory.
    Storages the mode cannot read (meta, invalidated) are skipped.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak_bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        self.current = self._total()
        self.peak_bytes = max(self.peak_bytes, self.current)
        return out

    def _track(self, t: torch.Tensor) -> None:
        if is_traceable_wrapper_subclass(t):  # DTensor: its local shard holds the memory, not the wrapper
            names, _ = t.__tensor_flatten__()
            for name in names:
                inner = getattr(t, name)
                if isinstance(inner, torch.Tensor):
                    self._track(inner)
            return
        try:
            storage = t.untyped_storage()
            key = id(storage)
        except (RuntimeError, NotImplementedError):
            return  # tensor subclasses without one storage (DTensor outputs are unwrapped below them)
        if key not in self._live:
            self._live[key] = weakref.ref(storage, lambda _, k=key: self._live.pop(k, None))

    def _total(self) -> int:
        total = 0
        for ref in list(self._live.values()):
            storage = ref()
            if storage is not None:
                try:  # noqa: SIM105 (hot loop: a try costs less than contextlib.suppress)
                    total += storage.nbytes()
                except RuntimeError:
                    pass
        return total


@dataclass
class StepMemory:
    """Peak live-tensor bytes of a steady-state step, the live bytes before it, and the process peak RSS."""

    peak_bytes: int
    start_bytes: int
    rss_peak_bytes: int


def synthetic_batches(vocab: int, seq: int, micro: int, accum: int, seed: int = 0) -> list[dict[str, Any]]:
    """`accum` micro-batches of random tokens (labels = inputs, as causal-LM training uses them)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(accum):
        ids = torch.randint(0, vocab, (micro, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def measure_step(
    config: Any,
    strategy: Strategy,
    seq: int,
    micro: int,
    accum: int = 1,
    precision: str = "fp32",
    attn_implementation: str = "sdpa",
    lora_rank: int = 0,
) -> StepMemory:
    """Build the model as `overdrive train` does (meta, parallelize, materialize) and measure step 2.

    Needs the process group the strategy asks for (`init_runtime`): run it under torchrun for several ranks.
    `lora_rank`: LoRA adapters on every decoder matmul (peft all-linear), as `--lora-r` trains them.
    """
    from overdrive.config import TrainConfig
    from overdrive.parallel import build_engine
    from overdrive.parallel.adapters import AdapterSpec
    from overdrive.parallel.distributed import init_runtime
    from overdrive.parallel.materialize import build_meta_model, materialize, meta_reference
    from overdrive.train.optim import make_optimizer

    runtime = init_runtime(strategy)
    cfg = TrainConfig()
    batches = synthetic_batches(config.vocab_size, seq, micro, accum, seed=runtime.rank)
    num_items = micro * seq * accum * runtime.dp_size
    with LiveStorageBytes() as mem:
        model = build_meta_model(config, attn_implementation, "float32")
        reference = meta_reference(model)
        engine = build_engine(
            model,
            strategy,
            runtime,
            lambda m: make_optimizer(m, cfg),
            lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
            1.0,
            precision,
            micro_batch_size=micro,
            fill=lambda m: materialize(m, reference, seed=0, device=runtime.device),
            adapters=AdapterSpec(r=lora_rank, alpha=16.0, dropout=0.0, target="all-linear") if lora_rank else None,
        )
        engine.forward_backward(batches, num_items)
        engine.step(1.0)
        start = mem.current
        mem.peak_bytes = start
        engine.forward_backward(batches, num_items)
        engine.step(1.0)
        peak = mem.peak_bytes
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return StepMemory(peak_bytes=peak, start_bytes=start, rss_peak_bytes=rss)
