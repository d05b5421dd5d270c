"""patch_model on tiny Llama/Mistral/Qwen2/Qwen3: same loss and gradients as HF, HF API kept intact."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import overdrive.patches._causal_lm as causal_lm_mod
import overdrive.patches.llama as llama_mod
from overdrive.patches import patch_model, unpatch_model
from overdrive.patches._swap import is_swapped
from tests.numerics import rel
from tests.patches.models import MODEL_TYPES, tiny_model


def _batch(vocab: int, b: int = 3, t: int = 37, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    labels[0, 20:] = -100
    return ids, labels


def _pair(model_type: str, **overrides: object):
    ref = tiny_model(model_type, **overrides).train()
    pat = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a supported model must patch without any fallback warning
        report = patch_model(pat, strict=True)
    return ref, pat, report


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("variant", ["plain", "num_items", "padded"])
def test_loss_and_every_grad_match_hf(model_type: str, variant: str) -> None:
    ref, pat, report = _pair(model_type)
    assert set(report.applied) == {"rms_norm", "swiglu", "rope", "fused_cross_entropy"}
    ids, labels = _batch(ref.config.vocab_size)
    kwargs: dict[str, object] = {"input_ids": ids, "labels": labels}
    if variant == "num_items":
        kwargs["num_items_in_batch"] = torch.tensor(123)
    if variant == "padded":
        mask = torch.ones_like(ids)
        mask[1, -7:] = 0
        kwargs["attention_mask"] = mask
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
        labels[1, -7:] = -100
    out_ref = ref(**kwargs)
    out_pat = pat(**kwargs)
    assert out_pat.logits is None  # fused path: no [tokens x vocab] logits
    assert rel(out_pat.loss, out_ref.loss) <= 1e-5
    out_ref.loss.backward()
    out_pat.loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in pat.named_parameters():
        assert p.grad is not None, name
        assert rel(p.grad, ref_params[name].grad) <= 1e-5, name


def test_kernels_are_actually_called(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"rms": 0, "swiglu": 0, "rope": 0, "ce": 0, "lm_head": 0}

    def counting(key: str, fn):
        def wrapper(*a, **k):
            calls[key] += 1
            return fn(*a, **k)

        return wrapper

    monkeypatch.setattr(llama_mod, "_rms_norm", counting("rms", llama_mod._rms_norm))
    monkeypatch.setattr(llama_mod, "_swiglu", counting("swiglu", llama_mod._swiglu))
    monkeypatch.setattr(llama_mod, "_rope", counting("rope", llama_mod._rope))
    monkeypatch.setattr(
        causal_lm_mod, "fused_causal_lm_loss", counting("ce", causal_lm_mod.fused_causal_lm_loss)
    )
    _, pat, _ = _pair("qwen3")
    pat.lm_head.register_forward_hook(lambda *_: calls.__setitem__("lm_head", calls["lm_head"] + 1))
    ids, labels = _batch(pat.config.vocab_size)
    pat(input_ids=ids, labels=labels)
    # qwen3: 2 layers x (2 norms + q_norm + k_norm) + final norm; 2 MLPs; 2 attentions; fused CE, no lm_head call
    assert calls == {"rms": 9, "swiglu": 2, "rope": 2, "ce": 1, "lm_head": 0}


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_logits_paths_match_hf(model_type: str) -> None:
    ref, pat, _ = _pair(model_type)
    ids, labels = _batch(ref.config.vocab_size)
    # no labels -> logits (e.g. generate); eval + labels -> HF path with logits and loss
    torch.testing.assert_close(pat(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    ref.eval()
    pat.eval()
    o_ref, o_pat = ref(input_ids=ids, labels=labels), pat(input_ids=ids, labels=labels)
    assert o_pat.logits is not None
    torch.testing.assert_close(o_pat.loss, o_ref.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        pat(input_ids=ids, logits_to_keep=1).logits,
        ref(input_ids=ids, logits_to_keep=1).logits,
        rtol=1e-5,
        atol=1e-5,
    )
    # return_dict=False keeps HF's tuple convention
    ref.train()
    pat.train()
    tup = pat(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(tup, tuple)
    torch.testing.assert_close(tup[0], ref(input_ids=ids, labels=labels).loss, rtol=1e-5, atol=0)


def test_generate_matches_hf() -> None:
    ref, pat, _ = _pair("llama")
    ref.eval()
    pat.eval()
    ids, _ = _batch(ref.config.vocab_size, b=2, t=6)
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(pat.generate(ids, **kw), ref.generate(ids, **kw))


def test_tied_embeddings_grads_match() -> None:
    ref, pat, _ = _pair("qwen2", tie_word_embeddings=True)
    assert pat.lm_head.weight is pat.model.embed_tokens.weight
    ids, labels = _batch(ref.config.vocab_size)
    ref(input_ids=ids, labels=labels).loss.backward()
    pat(input_ids=ids, labels=labels).loss.backward()
    assert rel(pat.lm_head.weight.grad, ref.lm_head.weight.grad) <= 1e-5


def test_state_dict_and_save_pretrained_roundtrip(tmp_path: Path) -> None:
    ref, pat, _ = _pair("mistral")
    assert list(pat.state_dict()) == list(ref.state_dict())
    assert type(pat).__name__ == "MistralForCausalLM" and isinstance(pat, type(ref))
    pat.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.architectures == ["MistralForCausalLM"]
    for (k1, v1), (k2, v2) in zip(loaded.state_dict().items(), ref.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)


def test_unsupported_architecture_warns_or_raises() -> None:
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    before = [type(m) for m in model.modules()]
    with pytest.warns(UserWarning, match="no kernel patches for model_type='gpt2'"):
        report = patch_model(model)
    assert not report.supported and report.applied == {}
    assert [type(m) for m in model.modules()] == before
    with pytest.raises(ValueError, match="gpt2"):
        patch_model(model, strict=True)


def test_idempotent_and_unpatch() -> None:
    ref, pat, first = _pair("llama")
    again = patch_model(pat)
    assert again.applied == first.applied
    assert sum(is_swapped(m) for m in pat.modules()) == 5 + 2 + 2 + 1
    restored = unpatch_model(pat)
    assert restored == 10 and not any(is_swapped(m) for m in pat.modules())
    ids, labels = _batch(ref.config.vocab_size)
    assert pat(input_ids=ids, labels=labels).logits is not None  # back to HF's forward


def test_feature_selection_and_fallback_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("llama")
    report = patch_model(model, fused_cross_entropy=False, rope=False)
    assert set(report.applied) == {"rms_norm", "swiglu"}
    assert not is_swapped(model) and not is_swapped(model.model.layers[0].self_attn)

    monkeypatch.setattr(llama_mod, "check_mlp", lambda _m: "pretend the MLP changed")
    fresh = tiny_model("llama")
    with pytest.warns(UserWarning, match="swiglu not patched \\(pretend the MLP changed\\)"):
        report = patch_model(fresh)
    assert "swiglu" in report.skipped and not is_swapped(fresh.model.layers[0].mlp)
    assert is_swapped(fresh.model.norm)
    strict_model = tiny_model("llama")
    with pytest.raises(ValueError, match="swiglu not patched"):
        patch_model(strict_model, strict=True)
    # a strict failure leaves nothing half-patched
    assert not any(is_swapped(m) for m in strict_model.modules())


def test_self_check_rejects_different_math() -> None:
    class NotLlamaNorm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(4))
            self.variance_epsilon = 1e-6

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # Gemma-style (1 + w): must be rejected
            return torch.nn.functional.rms_norm(x, (x.shape[-1],), eps=self.variance_epsilon) * (
                1 + self.weight
            )

    assert "not Llama-style" in (llama_mod.check_rms_norm(NotLlamaNorm()) or "")
