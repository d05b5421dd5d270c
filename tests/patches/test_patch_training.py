"""30 bf16-autocast training steps: patched and unpatched loss curves stay together."""

from __future__ import annotations

import copy

import pytest
import torch

from overdrive.patches import patch_model
from tests.patches.models import tiny_model


def _curve(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for ids, labels in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_bf16_training_curves_match(model_type: str) -> None:
    ref = tiny_model(model_type).train()
    pat = copy.deepcopy(ref)
    patch_model(pat, strict=True)
    g = torch.Generator().manual_seed(0)
    # a few fixed batches revisited, so the loss actually drops and the curves are informative
    pool = [torch.randint(0, ref.config.vocab_size, (4, 48), generator=g) for _ in range(3)]
    batches = [(pool[i % 3], pool[i % 3]) for i in range(30)]
    ref_curve = _curve(ref, batches)
    pat_curve = _curve(pat, batches)
    assert ref_curve[-1] < ref_curve[0] - 1.0  # it learns
    diffs = [abs(a - b) for a, b in zip(ref_curve, pat_curve, strict=True)]
    # bf16 autocast: both runs round matmul outputs to bf16 (8-bit mantissa, ~4e-3 relative); the
    # kernels differ only in where they round (fp32 weight-grad accumulation, fp32 activation grads),
    # so per-step losses around 6 must agree to 1e-2 absolute over 30 Adam steps.
    assert max(diffs) <= 1e-2, diffs
