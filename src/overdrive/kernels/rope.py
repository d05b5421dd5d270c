"""Rotary position embedding applied to q and k in one autograd node.

Why: HF's ``apply_rotary_pos_emb`` builds ``rotate_half`` from two slices, a negation and a ``cat``
for q and again for k, and autograd replays each of those (slice backward allocates zero-filled
buffers) in backward. The rotation is orthogonal, so its backward is the inverse rotation, which we
apply directly: ``dx = g*cos - rotate_half(g*sin)``. Forward arithmetic is the same expression as
HF's, so outputs are bit-identical.

Reference (HF ``modeling_llama.apply_rotary_pos_emb``, shared by Mistral/Qwen2/Qwen3)::

    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)

On CUDA, Liger-Kernel's ``liger_rotary_pos_emb`` is used when importable and the layouts are the
standard ``[batch, heads, seq, head_dim]`` with cos/sin in the same dtype as q/k.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["apply_rotary_pos_emb", "reference_apply_rotary_pos_emb", "rotate_half"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _unrotate(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``g*cos + rotate_half^T(g*sin)`` with ``rotate_half^T([a, b]) = [b, -a]``, done in place on two buffers."""
    half = g.shape[-1] // 2
    out = g * cos
    gs = g * sin
    out[..., :half] += gs[..., half:]
    out[..., half:] -= gs[..., :half]
    return out.to(dtype)


def reference_apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


class _RopeFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = (q.dtype, k.dtype)
        q_out = (q * cos) + (rotate_half(q) * sin)
        k_out = (k * cos) + (rotate_half(k) * sin)
        return q_out, k_out

    @staticmethod
    def backward(ctx: Any, gq: torch.Tensor, gk: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        q_dtype, k_dtype = ctx.dtypes
        dq = dk = None
        if ctx.needs_input_grad[0] and gq is not None:
            dq = _unrotate(gq, cos, sin, q_dtype)
        if ctx.needs_input_grad[1] and gk is not None:
            dk = _unrotate(gk, cos, sin, k_dtype)
        return dq, dk, None, None


def _liger_rope() -> Any:
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except Exception:
        return None
    return liger_rotary_pos_emb


def apply_rotary_pos_emb(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
    use_liger: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for HF's ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``."""
    if cos.requires_grad or sin.requires_grad:  # learned frequencies: keep autograd's general formula
        return reference_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
    if use_liger and q.is_cuda and unsqueeze_dim == 1 and q.dtype == cos.dtype == k.dtype:
        fn = _liger_rope()
        if fn is not None:
            return fn(q, k, cos, sin)
    return _RopeFn.apply(q, k, cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim))
