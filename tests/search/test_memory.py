"""The memory model's formulas against hand-counted values for the micro config, the saved-tensor count of a
real HF decoder layer, and one measured step (live-tensor peak) within ±10%."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from overdrive.parallel.strategy import Strategy
from overdrive.search import activations as act
from overdrive.search.layout import Layout
from overdrive.search.memory import estimate, stages, state_bytes
from overdrive.search.shape import ModelShape
from tests.conftest import MICRO_LLAMA

MICRO = ModelShape.from_config(LlamaConfig(**MICRO_LLAMA))


def layout(**kw) -> Layout:
    precision, lora = kw.pop("precision", "fp32"), kw.pop("lora", 0)
    micro, accum, world = kw.pop("micro", 2), kw.pop("accum", 1), kw.pop("world", 1)
    return Layout.from_strategy(Strategy(**kw), world, micro, accum, precision, lora)


def test_parameter_count_matches_the_meta_model() -> None:
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**MICRO_LLAMA))
    assert MICRO.total_params() == sum(p.numel() for p in model.parameters()) == 139_584


@pytest.mark.parametrize(
    ("kw", "per_token"),
    [
        # hand count, h=64 I=128 q=64 kv=32 heads=4 (see activations.py): norms 4(3h+1)·2, attention
        # 4(2q+2kv)+4·heads, MLP 4·4I
        ({}, 2 * 4 * (3 * 64 + 1) + 4 * (2 * 64 + 2 * 32) + 4 * 4 + 4 * 4 * 128),
        ({"kernels": True}, 2 * 4 * (2 * 64 + 1) + 4 * (2 * 64 + 2 * 32) + 4 * 4 + 3 * 4 * 128),
        # bf16 autocast: fp32 norm internals, bf16 matmul inputs (one cast per reading matmul: 3 + 2)
        ({"precision": "bf16"}, 2 * 4 * (2 * 64 + 1) + 5 * 2 * 64 + 2 * (2 * 64 + 2 * 32) + 16 + 4 * 2 * 128),
    ],
)
def test_layer_activation_formula(kw: dict, per_token: int) -> None:
    assert act.full_layer_bytes_per_token(MICRO, layout(**kw)) == per_token


def saved_bytes_per_token(kernels: bool, precision: str) -> float:
    """Distinct storages autograd saves in decoder layer 0 of a real model (weights excluded)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MICRO_LLAMA, attn_implementation="sdpa"))
    if kernels:
        from overdrive.patches import patch_model

        patch_model(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen.setdefault(key, t.untyped_storage().nbytes())
        return t

    layer, batch, seq = model.model.layers[0], 2, 32
    inner = layer.forward

    def hooked(*args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return inner(*args, **kwargs)

    layer.forward = hooked
    ids = torch.randint(0, 512, (batch, seq))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        model(input_ids=ids, labels=ids)
    rope = act.rope_bytes(MICRO, seq)
    return (sum(seen.values()) - rope) / (batch * seq)


@pytest.mark.parametrize(("kernels", "precision"), [(False, "fp32"), (True, "fp32"), (False, "bf16")])
def test_formula_counts_what_hf_saves(kernels: bool, precision: str) -> None:
    lay = layout(kernels=kernels, precision=precision)
    tokens = 64
    predicted = act.full_layer_bytes_per_token(MICRO, lay) + act.weight_cast_bytes(MICRO, lay) / tokens
    assert saved_bytes_per_token(kernels, precision) == pytest.approx(predicted, abs=1e-9)


def test_state_terms_by_sharding() -> None:
    n = MICRO.total_params()
    single = state_bytes(MICRO, layout(), stages(MICRO, layout())[0], cuda=True)
    assert single == {"params": 4 * n, "optimizer": 8 * n, "grads": 4 * n, "comm": 0.0}
    fsdp = layout(data_parallel="fsdp", world=2)
    sharded = state_bytes(MICRO, fsdp, stages(MICRO, fsdp)[0], cuda=True)
    assert sharded["params"] == 2 * n and sharded["optimizer"] == 4 * n and sharded["grads"] == 2 * n
    ddp = layout(data_parallel="ddp", world=2)
    assert state_bytes(MICRO, ddp, stages(MICRO, ddp)[0], cuda=True)["comm"] == 4 * n  # buckets


def test_lora_state_is_the_adapters_only() -> None:
    """Frozen base: gradients and AdamW state for the adapters peft adds (counted on the real model)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        LlamaForCausalLM(LlamaConfig(**MICRO_LLAMA)), LoraConfig(r=4, target_modules="all-linear")
    )
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert MICRO.layers * MICRO.lora_params_per_layer(4) == adapters
    lora = layout(lora=4)
    state = state_bytes(MICRO, lora, stages(MICRO, lora)[0], cuda=True)
    n = MICRO.total_params()
    assert state == {
        "params": 4 * (n + adapters),
        "optimizer": 8 * adapters,
        "grads": 4 * adapters,
        "comm": 0.0,
    }
    full = estimate(MICRO, layout(micro=4), 32, cuda=False)
    assert estimate(MICRO, layout(micro=4, lora=4), 32, cuda=False).live < full.live


def test_loss_peak_without_and_with_fused_ce() -> None:
    tokens, v = 4 * 32, 512
    plain = estimate(MICRO, layout(micro=4), 32, cuda=False)
    # the NLL gradient, the log-softmax output and its gradient, all fp32 [tokens x vocab]
    assert plain.phase == "loss backward" and plain.loss == 3 * 4 * tokens * v
    fused = estimate(MICRO, layout(micro=4, kernels=True), 32, cuda=False)
    assert fused.loss < plain.loss and fused.live < plain.live


def test_recompute_and_pipeline_shrink_activations() -> None:
    none = estimate(MICRO, layout(micro=8), 32).activations
    full = estimate(MICRO, layout(micro=8, activation_checkpointing="full"), 32).activations
    assert full < none / 2


def test_measured_step_peak_within_ten_percent() -> None:
    from overdrive.search.measure import measure_step

    config = LlamaConfig(**MICRO_LLAMA)
    cells = (({}, 4), ({"kernels": True, "activation_checkpointing": "full"}, 8), ({"lora": 8}, 4))
    for kw, micro in cells:
        strategy = Strategy(**{k: v for k, v in kw.items() if k != "lora"})
        measured = measure_step(config, strategy, 32, micro, lora_rank=kw.get("lora", 0)).peak_bytes
        predicted = estimate(MICRO, layout(micro=micro, **kw), 32, cuda=False).live
        assert predicted == pytest.approx(measured, rel=0.10), kw
