"""patch_transformers(): every supported model built afterwards is patched; unpatch_transformers() undoes it."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

import overdrive
from overdrive.patches import unpatch_transformers
from overdrive.patches._swap import is_swapped
from tests.numerics import rel
from tests.patches.models import MODEL_TYPES, tiny_config


@pytest.fixture
def patched_transformers():
    overdrive.patch_transformers()
    try:
        yield
    finally:
        unpatch_transformers()


def _loss_and_grad(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), model.model.layers[0].mlp.gate_proj.weight.grad


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_models_built_after_patch_transformers_are_patched(
    model_type: str, patched_transformers: None
) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    assert is_swapped(model) and is_swapped(model.model.norm) and is_swapped(model.model.layers[0].mlp)
    unpatch_transformers()
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(tiny_config(model_type))
    assert not any(is_swapped(m) for m in plain.modules())
    ids = torch.randint(0, plain.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    loss_p, grad_p = _loss_and_grad(model, ids)
    loss_u, grad_u = _loss_and_grad(plain, ids)
    assert rel(loss_p, loss_u) <= 1e-5 and rel(grad_p, grad_u) <= 1e-5


def test_from_pretrained_and_direct_construction(tmp_path: Path, patched_transformers: None) -> None:
    LlamaForCausalLM(tiny_config("llama")).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert is_swapped(loaded) and is_swapped(loaded.model.layers[1].self_attn)
    assert loaded.config.architectures == ["LlamaForCausalLM"]
    ids = torch.randint(0, 100, (1, 9))
    loaded.train()
    out = loaded(input_ids=ids, labels=ids)
    assert out.logits is None and torch.isfinite(out.loss)


def test_unsupported_models_still_build(patched_transformers: None) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    assert not any(is_swapped(m) for m in model.modules())
    assert any("model_type='gpt2'" in str(w.message) for w in caught)


def test_patch_transformers_options_are_forwarded(patched_transformers: None) -> None:
    overdrive.patch_transformers(fused_cross_entropy=False, swiglu=False)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2"))
    assert not is_swapped(model) and not is_swapped(model.model.layers[0].mlp)
    assert is_swapped(model.model.norm)
