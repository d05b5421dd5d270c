"""SwiGLU gating ``silu(gate) * up`` that recomputes the activation in backward.

Why: in ``down(silu(gate(x)) * up(x))`` autograd keeps ``gate``, ``silu(gate)`` and ``up`` — three
``[tokens, intermediate]`` tensors, the widest activations of the layer. Recomputing ``silu`` from
``gate`` in backward (cheap, elementwise) drops one of them (-1/3 of the MLP's saved activations)
and fuses the two backward multiplications.

Reference (HF ``LlamaMLP.forward``, same in Mistral/Qwen2/Qwen3)::

    down_proj(act_fn(gate_proj(x)) * up_proj(x))          # act_fn = SiLU for these models

The projections stay ordinary ``nn.Linear`` calls so their hooks (PEFT LoRA, FSDP, DeepSpeed)
keep working; only the activation-product is replaced. On CUDA, Liger-Kernel's
``LigerSiLUMulFunction`` is used when importable.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["reference_swiglu", "swiglu", "swiglu_mlp"]


def reference_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        gate, up = ctx.saved_tensors
        d_gate = d_up = None
        if ctx.needs_input_grad[0]:
            # same fused ATen kernel autograd uses for silu, in the input dtype: bitwise-equal to HF
            d_gate = torch.ops.aten.silu_backward(grad * up, gate)
        if ctx.needs_input_grad[1]:
            d_up = F.silu(gate).mul_(grad)  # the recomputation that replaces the saved silu(gate)
        return d_gate, d_up


def _liger_silu_mul() -> Any:
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except Exception:
        return None
    return LigerSiLUMulFunction


def swiglu(gate: torch.Tensor, up: torch.Tensor, use_liger: bool = True) -> torch.Tensor:
    """``silu(gate) * up`` with a recompute-in-backward autograd node."""
    if use_liger and gate.is_cuda and gate.dtype == up.dtype:
        fn = _liger_silu_mul()
        if fn is not None:
            return fn.apply(gate, up)
    return _SwiGLUFn.apply(gate, up)


def swiglu_mlp(
    x: torch.Tensor, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module
) -> torch.Tensor:
    """``down_proj(silu(gate_proj(x)) * up_proj(x))`` using :func:`swiglu` for the gating."""
    return down_proj(swiglu(gate_proj(x), up_proj(x)))
