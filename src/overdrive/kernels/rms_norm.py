"""RMSNorm with a hand-written backward that saves only the input and the per-row inverse RMS.

Why: HF's ``LlamaRMSNorm`` leaves autograd to keep the fp32 upcast, the normalised tensor and the
cast-back copy alive for backward (3 activations per norm, 2 norms per layer). This version saves
``x`` and a ``[..., 1]`` fp32 ``rstd`` and recomputes the rest, with the same forward numerics:

Reference (HF ``LlamaRMSNorm.forward``, also Mistral/Qwen2/Qwen3)::

    input_dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(input_dtype)          # NB: type promotion with weight's dtype

On CUDA, Liger-Kernel's ``LigerRMSNormFunction`` is used when importable and the dtypes match
(it implements the same Llama casting mode).

Test hook (fault injection, never for real runs): ``OVERDRIVE_FAULT_KERNEL=rms_norm`` in the environment
when this module is imported scales the gradient flowing back through this kernel by ``1 + 1e-3``. The
forward stays exact, so the patch self-test (forward only) still swaps the kernel in and only
``overdrive verify`` can catch the broken strategy, as it would a real backward bug.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

__all__ = ["rms_norm", "reference_rms_norm"]

# read once: torch.compile sees a constant, and a run is either faulty from the start or not at all
FAULT_GRAD_SCALE = 1.0 + 1e-3 if os.environ.get("OVERDRIVE_FAULT_KERNEL") == "rms_norm" else None


class _ScaleGradFn(torch.autograd.Function):
    """Identity forward, gradient times a constant: the OVERDRIVE_FAULT_KERNEL test hook."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        return grad_out * ctx.scale, None


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Exactly HF's LlamaRMSNorm math (used by tests and benchmarks)."""
    input_dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(input_dtype)


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        out = weight * (x32 * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        xhat32 = x.to(torch.float32) * rstd
        grad_w = None
        if ctx.needs_input_grad[1]:
            y = xhat32.to(x.dtype)
            grad_w = (grad_out * y).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # autograd would cast d/dy back to y's dtype before the fp32 upcast: mirror that rounding.
            gy32 = (grad_out * weight).to(x.dtype).to(torch.float32)
            dot = (gy32 * xhat32).mean(-1, keepdim=True)
            grad_x = (rstd * (gy32 - xhat32 * dot)).to(x.dtype)
        return grad_x, grad_w, None


def _liger_rms_norm() -> Any:
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except Exception:
        return None
    return LigerRMSNormFunction


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, use_liger: bool = True
) -> torch.Tensor:
    """``weight * normalize(x)`` with HF LlamaRMSNorm numerics and a memory-lean backward."""
    out = _rms_norm(x, weight, eps, use_liger)
    return out if FAULT_GRAD_SCALE is None else _ScaleGradFn.apply(out, FAULT_GRAD_SCALE)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, use_liger: bool) -> torch.Tensor:
    if use_liger and x.is_cuda and x.dtype == weight.dtype:
        fn = _liger_rms_norm()
        if fn is not None:
            try:
                return fn.apply(x, weight, eps, 0.0, "llama", False)
            except TypeError as exc:  # signature drift across Liger versions
                warnings.warn(
                    f"overdrive: Liger RMSNorm failed ({exc}); using the PyTorch kernel.", stacklevel=2
                )
    return _RMSNormFn.apply(x, weight, eps)
