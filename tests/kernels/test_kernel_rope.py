"""overdrive RoPE vs HF apply_rotary_pos_emb (+ LlamaRotaryEmbedding cos/sin)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama

from overdrive.kernels.rope import apply_rotary_pos_emb
from tests.numerics import no_worse_than_hf, rel

HF_ROPE = modeling_llama.apply_rotary_pos_emb


def _cos_sin(dtype: torch.dtype, b: int = 2, t: int = 13, d: int = 32):
    cfg = LlamaConfig(hidden_size=d * 4, num_attention_heads=4, max_position_embeddings=64)
    rot = modeling_llama.LlamaRotaryEmbedding(cfg)
    pos = torch.cat([torch.arange(5), torch.arange(t - 5)])[None].expand(b, -1)  # packed restart
    return rot(torch.zeros(1, dtype=dtype), pos)


def _run(fn, q, k, cos, sin, gq, gk, unsqueeze_dim=1):
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    qo, ko = fn(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    return [qo, ko, *torch.autograd.grad((qo, ko), (q, k), (gq.to(qo.dtype), gk.to(ko.dtype)))]


@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_fp32_matches_hf(layout: str) -> None:
    cos, sin = _cos_sin(torch.float32)
    q, k = torch.randn(2, 8, 13, 32), torch.randn(2, 4, 13, 32)  # GQA: fewer k heads
    dim = 1
    if layout == "bthd":
        q, k, dim = q.transpose(1, 2), k.transpose(1, 2), 2
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    ours, hf = (
        _run(apply_rotary_pos_emb, q, k, cos, sin, gq, gk, dim),
        _run(HF_ROPE, q, k, cos, sin, gq, gk, dim),
    )
    assert torch.equal(ours[0], hf[0]) and torch.equal(ours[1], hf[1])
    for a, b in zip(ours[2:], hf[2:], strict=True):
        assert rel(a, b) <= 1e-6


@pytest.mark.parametrize("cos_dtype", [torch.bfloat16, torch.float32])
def test_bf16_qk(cos_dtype: torch.dtype) -> None:
    """bf16 q/k with bf16 cos/sin, or fp32 cos/sin (autocast: embeddings stay fp32, q/k come out bf16)."""
    cos, sin = _cos_sin(cos_dtype)
    q, k = torch.randn(2, 8, 13, 32).bfloat16(), torch.randn(2, 4, 13, 32).bfloat16()
    gq, gk = torch.randn(2, 8, 13, 32), torch.randn(2, 4, 13, 32)
    ours, hf = _run(apply_rotary_pos_emb, q, k, cos, sin, gq, gk), _run(HF_ROPE, q, k, cos, sin, gq, gk)
    truth = _run(HF_ROPE, q.double(), k.double(), cos.double(), sin.double(), gq.double(), gk.double())
    assert torch.equal(ours[0], hf[0]) and torch.equal(ours[1], hf[1])
    for a, b, t in zip(ours[2:], hf[2:], truth[2:], strict=True):
        assert a.dtype == b.dtype == torch.bfloat16 and no_worse_than_hf(a, b, t)


def test_learned_cos_sin_get_gradients() -> None:
    cos, sin = (c.clone().requires_grad_() for c in _cos_sin(torch.float32))
    q, k = torch.randn(2, 8, 13, 32), torch.randn(2, 4, 13, 32)
    qo, ko = apply_rotary_pos_emb(q, k, cos, sin)
    gc, gs = torch.autograd.grad((qo.sum() + ko.sum()), (cos, sin))
    hq, hk = HF_ROPE(q, k, cos, sin)
    hc, hs = torch.autograd.grad((hq.sum() + hk.sum()), (cos, sin))
    assert rel(gc, hc) <= 1e-6 and rel(gs, hs) <= 1e-6
