"""overdrive RMSNorm vs HF LlamaRMSNorm / Qwen3RMSNorm."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from overdrive.kernels.rms_norm import rms_norm
from overdrive.patches._swap import swap_class
from overdrive.patches.llama import RMSNormPatch
from tests.numerics import no_worse_than_hf, rel, saved_tensor_bytes


def _pair(cls: type, dim: int, w_dtype: torch.dtype):
    torch.manual_seed(0)
    hf = cls(dim, eps=1e-5)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.3 * torch.randn(dim))
    hf = hf.to(w_dtype)
    ours = copy.deepcopy(hf)
    swap_class(ours, RMSNormPatch)
    return hf, ours


def _run(mod: torch.nn.Module, x: torch.Tensor, g: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    out = mod(x)
    gx, gw = torch.autograd.grad(out, [x, mod.weight], g.to(out.dtype))
    return out, gx, gw


@pytest.mark.parametrize("cls,shape", [(LlamaRMSNorm, (3, 7, 97)), (Qwen3RMSNorm, (2, 5, 4, 16))])
def test_fp32_matches_hf(cls: type, shape: tuple[int, ...]) -> None:
    hf, ours = _pair(cls, shape[-1], torch.float32)
    x, g = torch.randn(shape) * 2 + 0.5, torch.randn(shape)
    for a, b in zip(_run(ours, x, g), _run(hf, x, g), strict=True):
        assert a.dtype == b.dtype and rel(a, b) <= 1e-5


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_bf16_activations(w_dtype: torch.dtype) -> None:
    """bf16 inputs with fp32 weights (the autocast case) and all-bf16."""
    hf, ours = _pair(LlamaRMSNorm, 96, w_dtype)
    x, g = (torch.randn(4, 33, 96) * 3).bfloat16(), torch.randn(4, 33, 96)
    truth_mod = copy.deepcopy(hf).double()
    truth = _run(truth_mod, x.double(), g.double())
    res_ours, res_hf = _run(ours, x, g), _run(hf, x, g)
    assert torch.equal(res_ours[0], res_hf[0])  # forward is the same op sequence: bitwise equal
    assert res_ours[0].dtype == res_hf[0].dtype and res_ours[1].dtype == torch.bfloat16
    for a, b, t in zip(res_ours[1:], res_hf[1:], truth[1:], strict=True):
        assert a.dtype == b.dtype and no_worse_than_hf(a, b, t)


def test_saves_less_for_backward() -> None:
    x = torch.randn(64, 128, requires_grad=True)
    w = torch.ones(128, requires_grad=True)

    def saved_bytes(fn) -> int:
        return saved_tensor_bytes(fn, exclude=(x, w))

    hf = LlamaRMSNorm(128)
    ours = saved_bytes(lambda: rms_norm(x, w, 1e-6))
    assert ours < saved_bytes(lambda: hf(x)) / 2
