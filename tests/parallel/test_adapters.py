"""The adapters step of `parallelize`: peft injection on the meta model, deterministic filling, kernels."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from overdrive.parallel.adapters import AdapterSpec, apply_adapters, parameter_counts
from overdrive.parallel.materialize import build_meta_model, load_weights, materialize, meta_reference
from tests.conftest import MICRO_LLAMA

RUNTIME = types.SimpleNamespace(rank=0, device=torch.device("cpu"))
SPEC = AdapterSpec(r=4, alpha=8.0, dropout=0.0, target="all-linear", seed=7)


def config() -> LlamaConfig:
    return LlamaConfig(**{k: v for k, v in MICRO_LLAMA.items() if k not in ("model_type", "architectures")})


def adapted(spec: AdapterSpec = SPEC, fill_from=None):
    """A meta micro Llama with adapters, filled from (seed 42, module names) or `fill_from(model, reference)`."""
    model = build_meta_model(config(), "sdpa", "float32")
    reference = meta_reference(model)
    base_fill = (
        (lambda m: fill_from(m, reference))
        if fill_from
        else (lambda m: materialize(m, reference, seed=42, device="cpu"))
    )
    fill = apply_adapters(model, spec, base_fill, RUNTIME)
    fill(model)
    return model


def plain_model():
    model = build_meta_model(config(), "sdpa", "float32")
    materialize(model, meta_reference(model), seed=42, device="cpu")
    return model


def test_fill_maps_base_names_and_inits_adapters_deterministically() -> None:
    a, b = adapted(), adapted()
    base = plain_model().state_dict()
    state = a.state_dict()
    q = "model.layers.0.self_attn.q_proj"
    assert torch.equal(state[f"{q}.base_layer.weight"], base[f"{q}.weight"])
    assert all(torch.equal(t, b.state_dict()[k]) for k, t in state.items())  # same values every time
    lora_a = state[f"{q}.lora_A.default.weight"]
    assert lora_a.abs().sum() > 0 and not torch.isnan(lora_a).any()
    assert not torch.equal(lora_a, state["model.layers.1.self_attn.q_proj.lora_A.default.weight"])
    assert state[f"{q}.lora_B.default.weight"].abs().sum() == 0  # peft's init: the adapter starts at zero
    other_seed = adapted(AdapterSpec(r=4, alpha=8.0, dropout=0.0, target="all-linear", seed=8))
    assert not torch.equal(lora_a, other_seed.state_dict()[f"{q}.lora_A.default.weight"])


def test_adapted_model_starts_as_the_base_and_trains_only_adapters() -> None:
    from overdrive.config import TrainConfig
    from overdrive.train.optim import make_optimizer

    model, base = adapted(), plain_model()
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() == 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    optimizer = make_optimizer(model, TrainConfig())
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == parameter_counts(model)[0]
    lora = 2 * 4 * (128 + 96 + 96 + 128 + 192 + 192 + 192)  # r × (in + out) per adapted layer
    assert parameter_counts(model) == (lora, sum(p.numel() for p in base.parameters()) + lora)


def test_load_weights_fills_the_base_layers_of_an_adapted_model(tmp_path) -> None:
    source = AutoModelForCausalLM.from_config(config())
    source.save_pretrained(tmp_path)
    model = adapted(fill_from=lambda m, ref: load_weights(m, ref, tmp_path, "cpu"))
    state = model.state_dict()
    for name, tensor in source.state_dict().items():
        mapped = name.replace(".weight", ".base_layer.weight") if "_proj" in name else name
        assert torch.equal(state[mapped], tensor), name


def test_dora_magnitude_is_the_row_norm_of_the_base() -> None:
    spec = AdapterSpec(r=4, alpha=8.0, dropout=0.0, target="q_proj,down_proj", use_dora=True, seed=7)
    state = adapted(spec).state_dict()
    for layer in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        weight = state[f"{layer}.base_layer.weight"]
        magnitude = state[f"{layer}.lora_magnitude_vector.default.weight"]
        torch.testing.assert_close(magnitude, torch.linalg.norm(weight, dim=1), rtol=0, atol=1e-6)


def test_modules_to_save_starts_as_a_copy_of_the_base_module() -> None:
    spec = AdapterSpec(r=4, alpha=8.0, dropout=0.0, target="q_proj", modules_to_save=("lm_head",), seed=7)
    state = adapted(spec).state_dict()
    assert torch.equal(
        state["lm_head.modules_to_save.default.weight"], state["lm_head.original_module.weight"]
    )
    assert torch.equal(state["lm_head.original_module.weight"], plain_model().state_dict()["lm_head.weight"])


def test_kernels_apply_to_the_frozen_base_with_the_same_loss_and_gradients() -> None:
    """SwiGLU calls the (adapted) projections as modules; fused linear-CE reads the frozen nn.Linear head."""
    from overdrive.patches import patch_model
    from overdrive.patches._causal_lm import _fused_ce_usable

    spec = AdapterSpec(r=4, alpha=8.0, dropout=0.0, target="all-linear", seed=7)
    plain = adapted(spec)
    patched = build_meta_model(config(), "sdpa", "float32")
    reference = meta_reference(patched)
    patch_model(patched, strict=True)
    apply_adapters(patched, spec, lambda m: materialize(m, reference, seed=42, device="cpu"), RUNTIME)(
        patched
    )
    patched.train()
    assert _fused_ce_usable(patched, 0)  # the fused loss really runs
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # a non-zero B so that the adapters take part in forward and backward
        for model in (plain, patched):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    losses = []
    for model in (plain, patched):
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for name, p in patched.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert p.grad is None, name


@pytest.mark.gpu
def test_qlora_layers_compute_on_cuda() -> None:
    """NF4 base + LoRA on a CUDA device: forward and backward reach the adapters."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    spec = AdapterSpec(r=4, alpha=8.0, dropout=0.0, target="all-linear", load_in_4bit=True, seed=7)
    runtime = types.SimpleNamespace(rank=0, device=torch.device("cuda"))
    model = build_meta_model(config(), "sdpa", "float32")
    reference = meta_reference(model)
    apply_adapters(model, spec, lambda m: materialize(m, reference, seed=42, device="cuda"), runtime)(model)
    ids = torch.randint(0, 512, (2, 16), device="cuda")
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_merge_accepts_tied_weights_stored_once() -> None:
    """safetensors keeps one name of a tied lm_head/embedding (the tiny preset ties them); merge still fits."""
    from overdrive.parallel.adapter_outputs import merged_model

    cfg = config()
    cfg.tie_word_embeddings = True
    model = build_meta_model(cfg, "sdpa", "float32")
    reference = meta_reference(model)
    apply_adapters(model, SPEC, lambda m: materialize(m, reference, seed=42, device="cpu"), RUNTIME)(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    state = {k: v for k, v in model.state_dict().items() if k != "model.embed_tokens.weight"}
    merged = merged_model(state, cfg, model.peft_config["default"])
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() <= 1e-5
