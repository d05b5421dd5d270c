"""Packed rows (position_ids restart per document, attention_mask=None): no cross-document attention."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AttentionInterface

from overdrive.kernels.attention import (
    VARLEN_ATTENTION_NAME,
    register_varlen_attention,
    varlen_sdpa_attention,
)
from overdrive.patches import patch_model
from tests.numerics import rel
from tests.patches.models import MODEL_TYPES, tiny_model

LEN_A, LEN_B = 11, 17


def _docs(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, vocab, (1, LEN_A), generator=g), torch.randint(0, vocab, (1, LEN_B), generator=g)


def _packed(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(a.shape[1]), torch.arange(b.shape[1])])[None]
    return ids, pos


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max())


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_doc_logits_equal_doc_alone(model_type: str, attn: str) -> None:
    ref = tiny_model(model_type, attn=attn)
    pat = copy.deepcopy(ref)
    patch_model(pat, strict=True)
    a, b = _docs(ref.config.vocab_size)
    ids, pos = _packed(a, b)
    for mode in ("train", "eval"):
        ref.train(mode == "train")
        pat.train(mode == "train")
        with torch.no_grad():
            alone = ref(input_ids=b, use_cache=False).logits
            # HF: masking_utils detects the packing from position_ids (only when no cache is created)
            ref_packed = ref(input_ids=ids, position_ids=pos, use_cache=False).logits[:, LEN_A:]
            # patched: also with HF's default use_cache (the patch keeps the implicit cache off)
            pat_packed = pat(input_ids=ids, position_ids=pos).logits[:, LEN_A:]
        assert _max_abs(ref_packed, alone) <= 1e-5
        assert _max_abs(pat_packed, alone) <= 1e-5
        # and the first document really does see itself (the check is not vacuous)
        assert _max_abs(pat(input_ids=ids, position_ids=pos).logits[:, :LEN_A], alone[:, :LEN_A]) > 1e-3


def _packed_batch(vocab: int) -> dict[str, torch.Tensor]:
    """2 rows x 3 documents each, DataCollatorWithFlattening-style labels (-100 at each doc start)."""
    g = torch.Generator().manual_seed(5)
    lengths = [[5, 9, 10], [12, 4, 8]]
    ids = torch.randint(0, vocab, (2, 24), generator=g)
    pos = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in lengths])
    labels = ids.clone()
    labels[pos == 0] = -100
    return {"input_ids": ids, "position_ids": pos, "labels": labels, "lengths": torch.tensor(lengths)}


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_packed_training_loss_and_grads(model_type: str) -> None:
    ref = tiny_model(model_type).train()
    pat = copy.deepcopy(ref)
    patch_model(pat, strict=True)
    batch = _packed_batch(ref.config.vocab_size)
    lengths = batch.pop("lengths")
    loss_pat = pat(**batch).loss
    loss_ref = ref(**batch, use_cache=False).loss
    assert rel(loss_pat, loss_ref) <= 1e-5
    # the packed loss equals the token-weighted mean of each document trained alone
    total, count = 0.0, 0
    with torch.no_grad():
        for r, row in enumerate(lengths.tolist()):
            start = 0
            for n in row:
                doc = batch["input_ids"][r : r + 1, start : start + n]
                total += float(ref(input_ids=doc, labels=doc, use_cache=False).loss) * (n - 1)
                count += n - 1
                start += n
    assert abs(float(loss_pat.detach()) - total / count) <= 1e-5 * abs(total / count)
    loss_pat.backward()
    loss_ref.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in pat.named_parameters():
        assert rel(p.grad, ref_params[name].grad) <= 1e-5, name


def test_varlen_kwargs_reach_attention_for_batched_packed_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a varlen attention (flash-attn on CUDA, ``overdrive_varlen`` here) the patched forward passes
    ``cu_seq_lens`` derived from position_ids for *any* batch size (HF only infers them for batch 1)."""
    register_varlen_attention()
    seen: list[list[int]] = []

    def spy(module, q, k, v, mask, **kw):
        seen.append(kw["cu_seq_lens_q"].tolist() if kw.get("cu_seq_lens_q") is not None else [])
        return varlen_sdpa_attention(module, q, k, v, mask, **kw)

    AttentionInterface.register(VARLEN_ATTENTION_NAME, spy)
    try:
        ref = tiny_model("qwen2", attn="sdpa").train()
        pat = copy.deepcopy(ref)
        pat.set_attn_implementation(VARLEN_ATTENTION_NAME)
        patch_model(pat, strict=True)
        batch = _packed_batch(ref.config.vocab_size)
        batch.pop("lengths")
        loss_pat = pat(**batch).loss
        loss_ref = ref(**batch, use_cache=False).loss
    finally:
        register_varlen_attention()
    assert seen and seen[0] == [0, 5, 14, 24, 36, 40, 48]
    assert rel(loss_pat, loss_ref) <= 1e-5
    loss_pat.backward()
    loss_ref.backward()
    assert rel(pat.model.embed_tokens.weight.grad, ref.model.embed_tokens.weight.grad) <= 1e-5
