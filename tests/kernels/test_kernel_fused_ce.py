"""Fused linear + cross-entropy vs the naive lm_head + HF-style CE."""

from __future__ import annotations

import pytest
import torch

from overdrive.kernels._memory import LiveTensorMemory
from overdrive.kernels.fused_linear_cross_entropy import (
    FusedLinearCrossEntropyLoss,
    fused_causal_lm_loss,
    fused_linear_cross_entropy,
    reference_linear_cross_entropy,
)

N, H, V, CHUNK = 1000, 48, 1001, 256  # N % CHUNK != 0, V not a multiple of 8


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _inputs(dtype: torch.dtype = torch.float32, bias: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.2).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    t[::7] = -100
    t[CHUNK : 2 * CHUNK] = -100  # one whole chunk ignored
    return x, w, b, t


def _grads(loss: torch.Tensor, tensors: list[torch.Tensor], grad_out: torch.Tensor | None = None):
    return torch.autograd.grad(loss, tensors, grad_out)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("z_loss_weight", [0.0, 1e-3])
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_matches_reference(reduction: str, z_loss_weight: float, bias: bool) -> None:
    x, w, b, t = _inputs(bias=bias)
    params = [x, w] + ([b] if bias else [])
    kw = {"reduction": reduction, "z_loss_weight": z_loss_weight}
    ours = fused_linear_cross_entropy(x, w, t, b, chunk_size=CHUNK, **kw)
    ref = reference_linear_cross_entropy(x, w, t, b, **kw)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert _rel(ours, ref) <= 1e-5
    grad_out = torch.rand(N, generator=torch.Generator().manual_seed(1)) if reduction == "none" else None
    for g_ours, g_ref in zip(_grads(ours, params, grad_out), _grads(ref, params, grad_out), strict=True):
        assert _rel(g_ours, g_ref) <= 1e-5
    if reduction == "none":
        assert torch.all(ours[t == -100] == 0)


def test_num_items_in_batch_gradient_accumulation_semantics() -> None:
    """sum/num_items over micro-batches == one mean over the union of their target tokens."""
    x, w, _, t = _inputs(bias=False)
    half = N // 2
    n_items = (t != -100).sum()
    total = sum(
        fused_linear_cross_entropy(x[s], w, t[s], num_items_in_batch=n_items, chunk_size=CHUNK)
        for s in (slice(0, half), slice(half, N))
    )
    full = reference_linear_cross_entropy(x, w, t)
    assert _rel(total, full) <= 1e-5
    gx, gw = _grads(total, [x, w])
    rx, rw = _grads(full, [x, w])
    assert _rel(gx, rx) <= 1e-5 and _rel(gw, rw) <= 1e-5
    ref_nib = reference_linear_cross_entropy(x, w, t, num_items_in_batch=777)
    assert _rel(fused_linear_cross_entropy(x, w, t, num_items_in_batch=777), ref_nib) <= 1e-5


def test_shapes_module_and_causal_helper() -> None:
    x, w, _, t = _inputs(bias=False)
    x3, t3 = x[:999].reshape(3, 333, H), t[:999].reshape(3, 333)
    mod = FusedLinearCrossEntropyLoss(reduction="none", chunk_size=100)
    out = mod(x3, w, t3)
    assert out.shape == (3, 333)
    assert _rel(out, reference_linear_cross_entropy(x3, w, t3, reduction="none")) <= 1e-5
    head = torch.nn.Linear(H, V, bias=False)
    head.weight = torch.nn.Parameter(w.detach().clone())
    labels = t3.clone()
    hf_shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    causal = fused_causal_lm_loss(x3, head, labels)
    assert _rel(causal, reference_linear_cross_entropy(x3, head.weight, hf_shifted)) <= 1e-5
    assert _rel(fused_causal_lm_loss(x3, head, shift_labels=hf_shifted), causal) == 0.0
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(x, w, t, reduction="avg")
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(x, w, t[:10])


def test_matches_hf_for_causal_lm_loss() -> None:
    """Against transformers' own ForCausalLMLoss (shift, fp32 upcast, num_items_in_batch)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    x, w, _, t = _inputs(bias=False)
    x3, labels = x[:999].reshape(3, 333, H), t[:999].reshape(3, 333)
    head = torch.nn.Linear(H, V, bias=False)
    head.weight = torch.nn.Parameter(w.detach().clone())
    for n_items in (None, torch.tensor(1234)):
        ours = fused_causal_lm_loss(x3, head, labels, num_items_in_batch=n_items, chunk_size=CHUNK)
        hf = ForCausalLMLoss(head(x3), labels, vocab_size=V, num_items_in_batch=n_items)
        assert _rel(ours, hf) <= 1e-5
        for a, b in zip(_grads(ours, [x, head.weight]), _grads(hf, [x, head.weight]), strict=True):
            assert _rel(a, b) <= 1e-5


def _truth(x, w, b, t):
    """fp64 ground truth, for judging low-precision results."""
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    bd = b.detach().double().requires_grad_() if b is not None else None
    loss = reference_linear_cross_entropy(xd, wd, t, bd)
    return [loss, *torch.autograd.grad(loss, [xd, wd] + ([bd] if bd is not None else []))]


def test_bf16_autocast_is_at_least_as_accurate_as_hf() -> None:
    """Under bf16 autocast both paths run the matmuls in bf16 (relative rounding 2^-8 ~ 4e-3), so a
    fixed tolerance vs HF would be arbitrary. Instead both are judged against an fp64 ground truth:
    ours must be no worse than HF's bf16 path (x1.25 + 1e-4 slack for rounding-order noise)."""
    x, w, b, t = _inputs(bias=True)
    params = [x, w, b]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fused_linear_cross_entropy(x, w, t, b, chunk_size=CHUNK)
        hf = reference_linear_cross_entropy(x, w, t, b)
    ours_all = [ours, *_grads(ours, params)]
    hf_all = [hf, *_grads(hf, params)]
    assert all(g.dtype == torch.float32 for g in ours_all)  # fp32 params keep fp32 grads
    for o, h, tr in zip(ours_all, hf_all, _truth(x, w, b, t), strict=True):
        assert _rel(o, tr) <= 1.25 * _rel(h, tr) + 1e-4


def test_pure_bf16_tensors() -> None:
    """bf16 weights and activations (no autocast): same tolerance logic as above."""
    x, w, _, t = _inputs(dtype=torch.bfloat16, bias=False)
    ours = fused_linear_cross_entropy(x, w, t, chunk_size=CHUNK)
    hf = reference_linear_cross_entropy(x, w, t)
    ours_all, hf_all = [ours, *_grads(ours, [x, w])], [hf, *_grads(hf, [x, w])]
    assert ours_all[1].dtype == torch.bfloat16 and ours_all[2].dtype == torch.bfloat16
    for o, h, tr in zip(ours_all, hf_all, _truth(x, w, None, t), strict=True):
        assert _rel(o, tr) <= 1.25 * _rel(h, tr) + 1e-4


def test_peak_memory_is_a_chunk_not_the_logits() -> None:
    g = torch.Generator().manual_seed(0)
    n, h, v = 2048, 32, 4096
    x = torch.randn(n, h, generator=g).requires_grad_()
    w = (torch.randn(v, h, generator=g) * 0.1).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    peaks = {}
    for name, fn, kw in (
        ("naive", reference_linear_cross_entropy, {}),
        ("fused", fused_linear_cross_entropy, {"chunk_size": 256}),
    ):
        x.grad = w.grad = None
        with LiveTensorMemory() as mem:
            fn(x, w, t, **kw).backward()
        peaks[name] = mem.peak_bytes
    logits_bytes = n * v * 4
    assert peaks["naive"] >= 2 * logits_bytes  # the naive path holds the logits and their gradient
    assert peaks["fused"] <= 0.15 * peaks["naive"]


def test_traceable_by_torch_compile() -> None:
    x, w, _, t = _inputs(bias=False)
    compiled = torch.compile(fused_linear_cross_entropy, backend="aot_eager", dynamic=False)
    loss = compiled(x, w, t, chunk_size=CHUNK)
    ref = reference_linear_cross_entropy(x, w, t)
    assert _rel(loss, ref) <= 1e-5
    for a, r in zip(_grads(loss, [x, w]), _grads(ref, [x, w]), strict=True):
        assert _rel(a, r) <= 1e-5


def test_frozen_head_and_no_grad() -> None:
    """A frozen lm_head (LoRA) gets no weight gradient work; under no_grad only the loss is computed."""
    x, w, _, t = _inputs(bias=False)
    w_frozen = w.detach()
    ours = fused_linear_cross_entropy(x, w_frozen, t, chunk_size=CHUNK)
    ref = reference_linear_cross_entropy(x, w_frozen, t)
    (gx,) = _grads(ours, [x])
    (rx,) = _grads(ref, [x])
    assert _rel(ours, ref) <= 1e-5 and _rel(gx, rx) <= 1e-5
    with torch.no_grad():
        loss = fused_linear_cross_entropy(x, w, t, chunk_size=CHUNK)
    assert not loss.requires_grad and _rel(loss, ref) <= 1e-5
