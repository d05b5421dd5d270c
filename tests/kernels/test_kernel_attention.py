"""Packing helpers: document boundaries from position_ids and the per-document SDPA reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from overdrive.kernels.attention import (
    cu_seqlens_from_position_ids,
    document_ids_from_position_ids,
    flash_varlen_kwargs,
    varlen_sdpa_attention,
)

POS = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [5, 6, 7, 8, 0, 1, 2, 3]])  # row 2 starts mid-document


def test_boundaries() -> None:
    assert document_ids_from_position_ids(POS).tolist() == [
        [0, 0, 0, 1, 1, 2, 2, 2],
        [0, 0, 0, 0, 1, 1, 1, 1],
    ]
    cu, max_len = cu_seqlens_from_position_ids(POS)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 8, 12, 16] and max_len == 4
    kw = flash_varlen_kwargs(POS)
    assert kw["cu_seq_lens_q"] is kw["cu_seq_lens_k"] and kw["max_length_q"] == kw["max_length_k"] == 4


def _block_causal_mask(pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    doc = document_ids_from_position_ids(pos)
    i = torch.arange(pos.shape[1])
    causal = i[:, None] >= i[None, :]
    if window is not None:
        causal &= i[:, None] - i[None, :] < window
    return (doc[:, :, None] == doc[:, None, :]) & causal  # [B, L, L]


def _qkv(b: int = 2, hq: int = 4, hkv: int = 2, length: int = 8, d: int = 16):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, h, length, d, generator=g) for h in (hq, hkv, hkv))


def test_varlen_reference_equals_masked_sdpa() -> None:
    module = torch.nn.Module()
    module.num_key_value_groups = 2  # what HF's SDPA fallback reads from an attention module
    q, k, v = _qkv()
    for window in (None, 2):
        out, _ = varlen_sdpa_attention(
            module, q, k, v, None, scaling=0.25, position_ids=POS, sliding_window=window
        )
        mask = _block_causal_mask(POS, window)[:, None]
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True).transpose(
            1, 2
        )
        assert out.shape == (2, 8, 4, 16)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # explicit cu_seq_lens win over position_ids; a padding mask falls back to HF's SDPA path
    cu = cu_seqlens_from_position_ids(POS)[0]
    out2, _ = varlen_sdpa_attention(module, q, k, v, None, scaling=0.25, cu_seq_lens_q=cu, position_ids=None)
    torch.testing.assert_close(
        out2, varlen_sdpa_attention(module, q, k, v, None, scaling=0.25, position_ids=POS)[0]
    )
    dense = torch.ones(2, 1, 8, 8, dtype=torch.bool).tril()
    out3, _ = varlen_sdpa_attention(module, q, k, v, dense, scaling=0.25, position_ids=POS)
    ref3 = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=0.25, enable_gqa=True).transpose(
        1, 2
    )
    torch.testing.assert_close(out3, ref3, rtol=1e-5, atol=1e-6)
