"""A strategy on a world, reduced to the numbers the memory and time models need.

`Strategy` is being extended by other work (pipeline, selective recompute); fields that may not exist yet are
read with `getattr` and a neutral default, so the models accept either version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Layout:
    """Degrees, sharding, precision, recompute and kernels of one strategy on `world` ranks."""

    world: int = 1
    dp: int = 1
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = True
    data_parallel: str = "none"  # none | ddp | fsdp | hsdp
    engine: str = "torch"
    zero_stage: int = 0  # DeepSpeed stage, or the FSDP equivalent (3 / 2)
    shard: int = 1  # ranks a sharded state is split over
    offload: str = "none"
    param_dtype: str = "fp32"
    reduce_dtype: str = "fp32"
    precision: str = "fp32"  # the loop's autocast precision
    recompute: str = "none"  # none | full | every_k | selective
    ac_every: int = 1
    kernels: bool = False
    compile: bool = False
    micro: int = 1
    accum: int = 1
    lora_rank: int = 0  # LoRA on every decoder matmul (peft all-linear), the base frozen; 0: full training

    @classmethod
    def from_strategy(
        cls, strategy: Any, world: int, micro: int, accum: int, precision: str = "fp32", lora_rank: int = 0
    ) -> Layout:
        tp = strategy.tp_degree(world)
        pp_field = int(getattr(strategy, "pipeline_parallel", 1))
        pp = world if pp_field == -1 else pp_field
        dp = max(1, world // (tp * pp))
        dpk = strategy.data_parallel
        if strategy.engine == "deepspeed":
            zero = strategy.resolved_zero_stage
        elif dpk in ("fsdp", "hsdp"):
            reshard = getattr(strategy, "resolved_reshard_after_forward", strategy.reshard_after_forward)
            zero = 3 if reshard in (True, None) else 2
        else:
            zero = 0
        shard = (strategy.shard_size or dp) if dpk == "hsdp" else dp
        return cls(
            world=world,
            dp=dp,
            tp=tp,
            pp=pp,
            sequence_parallel=bool(strategy.sequence_parallel),
            data_parallel=dpk,
            engine=strategy.engine,
            zero_stage=zero,
            shard=shard if zero else 1,
            offload=strategy.offload,
            param_dtype=strategy.param_dtype,
            reduce_dtype=strategy.reduce_dtype,
            precision=precision,
            recompute=strategy.activation_checkpointing,
            ac_every=strategy.ac_every,
            kernels=bool(strategy.kernels),
            compile=bool(strategy.compile),
            micro=micro,
            accum=accum,
            lora_rank=lora_rank,
        )

    @property
    def fsdp(self) -> bool:
        return self.engine == "torch" and self.data_parallel in ("fsdp", "hsdp")

    @property
    def deepspeed(self) -> bool:
        return self.engine == "deepspeed"

    @property
    def compute_bytes(self) -> int:
        """Bytes of matmul inputs/outputs: bf16 under autocast or bf16 parameters, else fp32."""
        return 2 if self.precision in ("bf16", "fp16") or self.param_dtype == "bf16" else 4

    def recomputed_layers(self, layers: int) -> int:
        if self.recompute == "full":
            return layers
        if self.recompute == "every_k":
            return -(-layers // max(1, self.ac_every))
        return 0
