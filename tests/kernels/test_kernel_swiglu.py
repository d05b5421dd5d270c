"""overdrive SwiGLU vs HF LlamaMLP."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from overdrive.kernels.swiglu import swiglu, swiglu_mlp
from overdrive.patches._swap import swap_class
from overdrive.patches.llama import SwiGLUMLPPatch
from tests.numerics import no_worse_than_hf, rel, saved_tensor_bytes


def _pair(bias: bool = False):
    torch.manual_seed(0)
    hf = LlamaMLP(
        LlamaConfig(
            hidden_size=40, intermediate_size=99, num_attention_heads=4, hidden_act="silu", mlp_bias=bias
        )
    )
    ours = copy.deepcopy(hf)
    swap_class(ours, SwiGLUMLPPatch)
    return hf, ours


def _run(mod: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, autocast: bool = False):
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = mod(x)
    params = [x] + [p for _, p in sorted(mod.named_parameters())]
    return [out, *torch.autograd.grad(out, params, g.to(out.dtype))]


@pytest.mark.parametrize("bias", [False, True])
def test_fp32_matches_llama_mlp(bias: bool) -> None:
    hf, ours = _pair(bias)
    x, g = torch.randn(3, 17, 40), torch.randn(3, 17, 40)
    for a, b in zip(_run(ours, x, g), _run(hf, x, g), strict=True):
        assert rel(a, b) <= 1e-5


def test_bf16_autocast_matches_llama_mlp() -> None:
    hf, ours = _pair()
    x, g = torch.randn(5, 31, 40), torch.randn(5, 31, 40)
    truth = _run(copy.deepcopy(hf).double(), x.double(), g.double())
    res_ours, res_hf = _run(ours, x, g, autocast=True), _run(hf, x, g, autocast=True)
    assert torch.equal(res_ours[0], res_hf[0])  # forward: same bf16 ops
    for a, b, t in zip(res_ours, res_hf, truth, strict=True):
        assert a.dtype == b.dtype and no_worse_than_hf(a, b, t)


def test_pure_bf16_function() -> None:
    g0 = torch.Generator().manual_seed(1)
    gate, up, g = (torch.randn(64, 77, generator=g0).bfloat16() for _ in range(3))
    outs = {}
    for name, fn, dt in (
        ("ours", swiglu, torch.bfloat16),
        ("hf", None, torch.bfloat16),
        ("truth", None, torch.float64),
    ):
        a, u = gate.to(dt).requires_grad_(), up.to(dt).requires_grad_()
        out = fn(a, u) if fn else torch.nn.functional.silu(a) * u
        outs[name] = [out, *torch.autograd.grad(out, [a, u], g.to(dt))]
    # same ATen kernels in the same dtype as autograd's backward: bitwise equal, not just close
    for a, b, t in zip(outs["ours"], outs["hf"], outs["truth"], strict=True):
        assert torch.equal(a, b) and no_worse_than_hf(a, b, t)


def test_saves_one_activation_less() -> None:
    hf, ours = _pair()
    x = torch.randn(256, 40, requires_grad=True)

    act = 256 * 99 * 4
    assert saved_tensor_bytes(lambda: hf(x)) - saved_tensor_bytes(lambda: ours(x)) == act
    assert torch.equal(swiglu_mlp(x, hf.gate_proj, hf.up_proj, hf.down_proj), hf(x))
