"""CUDA checks (Liger/Triton fast paths when installed, else the PyTorch kernels on GPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from overdrive.kernels.fused_linear_cross_entropy import (
    fused_linear_cross_entropy,
    reference_linear_cross_entropy,
)
from overdrive.patches import patch_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_fused_ce_cuda(dtype: torch.dtype, tol: float) -> None:
    # tf32 / bf16 tensor-core matmuls: looser than the CPU fp32 bound (1e-5); bf16 has 8 mantissa bits.
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4099, 256, device="cuda", generator=g).to(dtype).requires_grad_()
    w = (torch.randn(32003, 256, device="cuda", generator=g) * 0.05).to(dtype).requires_grad_()
    t = torch.randint(0, 32003, (4099,), device="cuda", generator=g)
    t[::5] = -100
    ours = fused_linear_cross_entropy(x, w, t)
    ref = reference_linear_cross_entropy(x, w, t)
    assert _rel(ours, ref) <= tol
    for a, b in zip(torch.autograd.grad(ours, [x, w]), torch.autograd.grad(ref, [x, w]), strict=True):
        assert _rel(a, b) <= tol


def test_patched_llama_cuda_bf16() -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=8000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    ref = LlamaForCausalLM(cfg).cuda().train()
    pat = copy.deepcopy(ref)
    patch_model(pat)
    ids = torch.randint(0, 8000, (4, 256), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        l_r = ref(input_ids=ids, labels=ids).loss
        l_p = pat(input_ids=ids, labels=ids).loss
    assert abs(l_r.item() - l_p.item()) <= 1e-2
    l_r.backward()
    l_p.backward()
    assert _rel(pat.model.embed_tokens.weight.grad, ref.model.embed_tokens.weight.grad) <= 5e-2
