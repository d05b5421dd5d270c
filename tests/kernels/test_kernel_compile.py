"""Regional compile: every decoder block compiled in place, numerics and state_dict keys unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from overdrive.core.layers import decoder_layers
from overdrive.kernels.compile import compile_model, compile_regions
from overdrive.patches import patch_model


def _tiny(layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=211,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg).train()


def test_decoder_layers_finds_the_blocks() -> None:
    model = _tiny(3)
    assert decoder_layers(model) == list(model.model.layers)

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(64, 64)

    class Odd(torch.nn.Module):
        """4 blocks of Linear(64, 64) beside 8 small heads: the blocks hold the parameters."""

        def __init__(self) -> None:
            super().__init__()
            self.heads = torch.nn.ModuleList([torch.nn.Linear(4, 1) for _ in range(8)])
            self.trunk = torch.nn.Sequential(torch.nn.Identity())
            self.trunk.blocks = torch.nn.ModuleList([Block() for _ in range(4)])

    odd = Odd()
    assert decoder_layers(odd) == list(odd.trunk.blocks)
    with pytest.warns(UserWarning, match="no decoder-layer"):
        assert compile_regions(torch.nn.Linear(2, 2)) == 0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_patched_regional_compile_matches_eager(checkpointing: bool) -> None:
    eager = _tiny()
    patch_model(eager, strict=True)
    compiled = copy.deepcopy(eager)
    if checkpointing:
        for m in (eager, compiled):
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    keys = list(compiled.state_dict())
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # aot_eager traces forward+backward through dynamo/AOTAutograd (our autograd.Functions included)
    # without needing a C++ toolchain; inductor is exercised by benchmarks/kernels.py.
    assert compile_regions(compiled, backend="aot_eager") == 2
    assert compile_regions(compiled, backend="aot_eager") == 0  # idempotent
    assert list(compiled.state_dict()) == keys
    ids = torch.randint(0, 211, (2, 24), generator=torch.Generator().manual_seed(1))
    l_e = eager(input_ids=ids, labels=ids).loss
    l_c = compiled(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(l_c, l_e, rtol=1e-5, atol=0)
    l_e.backward()
    l_c.backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the blocks really ran compiled
    for (name, p_c), p_e in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_compile_model_full_is_in_place() -> None:
    model = _tiny()
    keys = list(model.state_dict())
    assert compile_model(model, regional=False, backend="eager") == 1
    assert list(model.state_dict()) == keys and model._compiled_call_impl is not None
