"""fp8 linear layers through torchao's float8 training (`torchao.float8.convert_to_float8_training`).

Each converted `nn.Linear` casts its input, weight and output gradient to fp8 with dynamic tensorwise scales
and runs the three matmuls of forward and backward on fp8 tensor cores (`torch._scaled_mm`); the master weights
and the optimizer stay in their own dtype. Only GPUs with fp8 tensor cores can run it (compute capability 8.9+:
H100/H200, L4/L40, RTX 40xx), so everything else is refused with one line before training starts.

Applied after the kernels (which may replace module classes) and before tensor parallelism and compile
(PARALLELIZE_ORDER), on the decoder layers' plain linears: the lm_head stays in high precision (its logits feed the
loss directly and the fused linear-cross-entropy kernel reads its weight), and torchao's fp8 matmul needs both
dimensions of a weight to be multiples of 16.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from overdrive.errors import UsageError

MIN_CAPABILITY = (8, 9)
FIX = "drop fp8 from the strategy"


def check_fp8(device: torch.device, tensor_parallel: int = 1) -> None:
    """Raise a one-line UsageError unless this run can train in fp8 (call before training starts)."""
    if device.type != "cuda":
        raise UsageError(
            f"fp8 needs a CUDA GPU with fp8 tensor cores (compute capability 8.9+, e.g. H100/H200) but this run "
            f"is on {device.type}; {FIX} or run on such a GPU"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise UsageError(
            f"fp8 needs compute capability 8.9+ (H100/H200, L4, RTX 40xx) but {name} has "
            f"{capability[0]}.{capability[1]}; {FIX} (use bf16)"
        )
    if importlib.util.find_spec("torchao") is None:
        raise UsageError(f"fp8 needs torchao; pip install 'overdrive[gpu]' or {FIX}")
    if tensor_parallel != 1:
        raise UsageError(f"fp8 with tensor_parallel is not supported; {FIX} or tensor_parallel")


def fp8_eligible(module: nn.Module, fqn: str) -> bool:
    """Plain linears of the model body whose weight dimensions torchao's fp8 matmul accepts.

    Not the lm_head, not LoRA adapter matrices (small, trainable: they stay in high precision while a frozen
    base linear may run in fp8), and not subclasses such as bitsandbytes' quantised linears.
    """
    names = fqn.split(".")
    if type(module) is not nn.Linear or names[-1] == "lm_head" or any(n.startswith("lora_") for n in names):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def apply_fp8(model: nn.Module) -> int:
    """Swap eligible linears for torchao `Float8Linear` in place; returns how many were converted."""
    from torchao.float8 import Float8Linear, convert_to_float8_training

    convert_to_float8_training(model, module_filter_fn=fp8_eligible)
    return sum(isinstance(m, Float8Linear) for m in model.modules())
