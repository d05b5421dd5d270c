"""Packing-aware attention helpers.

Our data pipeline packs several documents into one row (HF ``DataCollatorWithFlattening``
convention): ``position_ids`` restart at 0 at each document start, ``labels`` are -100 on each
document's first token and ``attention_mask`` is None. Documents must not attend to each other.

* sdpa/eager: transformers 5's ``masking_utils`` already turns restarting ``position_ids`` into a
  block-diagonal causal mask (``find_packed_sequence_indices``); the patches leave mask creation
  alone so that keeps working (tested in ``tests/patches``).
* flash-attention: HF only infers ``cu_seqlens`` from ``position_ids`` when batch size is 1, so a
  ``[B>1, L]`` packed batch would silently attend across documents. :func:`flash_varlen_kwargs`
  computes ``cu_seq_lens_q/k`` + ``max_length_q/k`` for any batch size; the patched causal-LM forward
  passes them down, which makes HF's flash path take ``flash_attn_varlen_func``.
* ``overdrive_varlen``: a pure-PyTorch attention implementation consuming the same kwargs (one SDPA
  call per document). It is the CPU reference for the varlen plumbing and avoids the O(L^2) dense
  mask when rows hold many short documents.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "VARLEN_ATTENTION_NAME",
    "document_starts",
    "cu_seqlens_from_position_ids",
    "document_ids_from_position_ids",
    "flash_varlen_kwargs",
    "register_varlen_attention",
    "uses_varlen_kwargs",
    "varlen_sdpa_attention",
]

VARLEN_ATTENTION_NAME = "overdrive_varlen"
_VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, L]``: True where a document starts (row start, or position not previous+1)."""
    pos = position_ids.reshape(-1, position_ids.shape[-1])
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    return starts


def document_ids_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Per-row document index (0, 0, 1, 1, 1, 2, ...) -- same rule as HF's packed-sequence detection."""
    return document_starts(position_ids).cumsum(-1) - 1


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative document boundaries over the flattened ``[B * L]`` tokens, and the longest document.

    Row boundaries always split documents (a document never spans two rows).
    """
    starts = document_starts(position_ids).reshape(-1)
    idx = starts.nonzero().reshape(-1).to(torch.int32)
    total = torch.tensor([starts.numel()], dtype=torch.int32, device=idx.device)
    cu = torch.cat((idx, total))
    max_len = int((cu[1:] - cu[:-1]).max().item()) if cu.numel() > 1 else 0
    return cu, max_len


def flash_varlen_kwargs(position_ids: torch.Tensor) -> dict[str, Any]:
    """kwargs understood by HF's flash-attention integration (and :func:`varlen_sdpa_attention`)."""
    cu, max_len = cu_seqlens_from_position_ids(position_ids)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len}


def uses_varlen_kwargs(config: Any) -> bool:
    """True for attention implementations that take ``cu_seq_lens_*`` (flash-attention family, ours)."""
    impl = getattr(config, "_attn_implementation", None) or ""
    return "flash" in impl or impl == VARLEN_ATTENTION_NAME


def varlen_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """HF attention-interface function: causal SDPA run separately on each packed document.

    Inputs are HF's ``[B, heads, L, D]``; output is ``[B, L, heads, D]`` like ``sdpa_attention_forward``.
    Falls back to HF's SDPA (with its mask) for padded batches or KV-cache decoding.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, hq, length, d = query.shape
    if (
        attention_mask is not None
        or key.shape[2] != length
        or (cu_seq_lens_q is None and position_ids is None)
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    cu = cu_seq_lens_q if cu_seq_lens_q is not None else cu_seqlens_from_position_ids(position_ids)[0]
    hkv = key.shape[1]
    q = query.transpose(1, 2).reshape(b * length, hq, d)
    k = key.transpose(1, 2).reshape(b * length, hkv, d)
    v = value.transpose(1, 2).reshape(b * length, hkv, d)
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        mask = None
        if sliding_window is not None and e - s > sliding_window:
            i = torch.arange(e - s, device=q.device)
            mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < sliding_window)
        o = F.scaled_dot_product_attention(
            qs,
            ks,
            vs,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=mask is None,
            scale=scaling,
            enable_gqa=hq != hkv,
        )
        out[s:e] = o.squeeze(0).transpose(0, 1)
    return out.reshape(b, length, hq, d), None


def register_varlen_attention(name: str = VARLEN_ATTENTION_NAME) -> str:
    """Register :func:`varlen_sdpa_attention` with transformers; use via ``attn_implementation=name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(name, varlen_sdpa_attention)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name
