"""Fused lm_head projection + cross-entropy that never materialises the [tokens x vocab] logits.

Why: for a causal LM the logits tensor is usually the single largest activation (8k tokens x 32k vocab
in fp32 is 1 GiB, and HF keeps the fp32 upcast, the log-softmax and its gradient alive at the same
time). Here the tokens are processed in chunks; each chunk's logits are computed, turned into the
loss *and* the gradient w.r.t. those logits, and immediately contracted back into the gradients of
the hidden states and of the lm_head weight. Peak extra memory is therefore ~chunk x vocab and the
backward pass only rescales gradients that were already computed.

Reference usage (what this replaces), from HF ``LlamaForCausalLM.forward`` + ``ForCausalLMLoss``::

    logits = lm_head(hidden_states)                       # [B, T, V], compute dtype
    loss = cross_entropy(logits.float().view(-1, V), shifted_labels.view(-1), ignore_index=-100,
                         reduction="sum" if num_items_in_batch else "mean") / (num_items_in_batch or 1)

On CUDA, Liger-Kernel's Triton implementation is used when it is importable (never required).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FusedLinearCrossEntropyLoss",
    "fused_causal_lm_loss",
    "fused_linear_cross_entropy",
    "reference_linear_cross_entropy",
    "shift_labels_for_causal_lm",
]

#: GPU: logits elements per chunk (32 Mi = 128 MiB fp32): big matmuls, bounded buffer.
GPU_CHUNK_ELEMENTS = 1 << 25
#: CPU: a chunk's fp32 logits buffer of ~4 Mi elements (16 MiB) stays cache/allocator friendly, but every
#: chunk also re-reads and re-writes the fp32 [vocab x hidden] weight-gradient accumulator, so chunks
#: are kept >= 2 x hidden tokens (that traffic then stays <= half of the logits traffic), capped at
#: 64 Mi elements (256 MiB). Measured in benchmarks/kernels.py: 512 tokens at 2048x256x8000 (bf16),
#: 1024 tokens at 8192x512x32000 (fp32) were the fastest.
CPU_CHUNK_ELEMENTS, CPU_MAX_CHUNK_ELEMENTS = 1 << 22, 1 << 26
_REDUCTIONS = ("mean", "sum", "none")


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def default_chunk_size(n_tokens: int, vocab_size: int, hidden_size: int, device_type: str = "cuda") -> int:
    """Tokens per chunk (a power of two, at most ``n_tokens``): see the constants above for the why."""
    vocab = max(vocab_size, 1)
    if device_type == "cpu":
        per = max(CPU_CHUNK_ELEMENTS // vocab, 2 * hidden_size)
        per = min(per, CPU_MAX_CHUNK_ELEMENTS // vocab)
    else:
        per = GPU_CHUNK_ELEMENTS // vocab
    return max(1, min(_pow2_floor(per), n_tokens))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype HF's ``lm_head`` matmul would run in (autocast dtype if autocast is active)."""
    dev = x.device.type
    if dev in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _chunk_grad_logits(
    logits: torch.Tensor,
    target: torch.Tensor,
    row_scale: torch.Tensor,
    z_loss_weight: float,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (ce, lse) and d(sum_i row_scale_i * loss_i)/d logits for one fp32 chunk, in place.

    ``row_scale`` is 0 for ignored rows so their gradient vanishes; ``target`` must already be clamped
    to a valid index for those rows. ``logits`` is overwritten with the gradient. One ``exp`` pass:
    exp(logits - max) gives both the normaliser and, rescaled, the softmax.
    """
    tgt_logit = logits.gather(1, target.unsqueeze(1)).squeeze(1)
    if lse is None:
        row_max = logits.amax(dim=-1, keepdim=True)
        probs = logits.sub_(row_max).exp_()
        denom = probs.sum(dim=-1)
        lse = row_max.squeeze(1) + denom.log()
        inv_denom: torch.Tensor | float = denom.reciprocal()
    else:
        probs = logits.sub_(lse.unsqueeze(1)).exp_()
        inv_denom = 1.0
    coef = row_scale * (1.0 + 2.0 * z_loss_weight * lse) if z_loss_weight else row_scale
    probs.mul_((coef * inv_denom).unsqueeze(1))
    probs.scatter_add_(1, target.unsqueeze(1), -row_scale.unsqueeze(1).to(probs.dtype))
    return lse - tgt_logit, lse, probs


class _Workspace:
    """Per-call chunk buffers, reused by every chunk.

    Why: a fresh ``chunk x vocab`` tensor per chunk is, on CPU, a fresh mmap that is page-faulted
    (zero-filled by the kernel) on first touch -- for a 64 MiB chunk that costs as much as the
    softmax itself. Logits, their fp32 upcast, the low-precision gradient and the weight-gradient
    partial product all live in buffers allocated once per call.
    """

    def __init__(self, rows: int, vocab: int, hidden: int, dtype: torch.dtype, device: torch.device) -> None:
        self.f32 = torch.empty((rows, vocab), dtype=torch.float32, device=device)
        low = dtype != torch.float32
        self.low = torch.empty((rows, vocab), dtype=dtype, device=device) if low else None
        self.gw = torch.empty((vocab, hidden), dtype=dtype, device=device) if low else None

    def logits(self, x_c: torch.Tensor, w_c: torch.Tensor, b_c: torch.Tensor | None) -> torch.Tensor:
        """fp32 logits of one chunk (computed in the compute dtype, like HF's lm_head + ``.float()``)."""
        c = x_c.shape[0]
        dst = self.low[:c] if self.low is not None else self.f32[:c]
        if b_c is None:
            torch.mm(x_c, w_c.t(), out=dst)
        else:
            torch.addmm(b_c, x_c, w_c.t(), out=dst)
        if self.low is not None:
            self.f32[:c].copy_(dst)
        return self.f32[:c]

    def contract(
        self,
        grad: torch.Tensor,
        x_c: torch.Tensor,
        w_c: torch.Tensor,
        grad_x_out: torch.Tensor | None,
        grad_w: torch.Tensor | None,
        grad_b: torch.Tensor | None,
    ) -> None:
        """Back-project a chunk's logits gradient: grad_x rows written, grad_w/grad_b accumulated in fp32.

        A ``None`` target is skipped (e.g. a frozen lm_head under LoRA costs no weight-gradient matmul).
        """
        if grad_b is not None:
            grad_b.add_(grad.sum(0))
        if grad_x_out is None and grad_w is None:
            return
        g = grad if self.low is None else self.low[: grad.shape[0]].copy_(grad)
        if grad_x_out is not None:
            torch.mm(g, w_c, out=grad_x_out)
        if grad_w is None:
            return
        if self.gw is None:
            grad_w.addmm_(g.t(), x_c)
        else:
            torch.mm(g.t(), x_c, out=self.gw)  # low-precision matmul, fp32 accumulation across chunks
            grad_w.add_(self.gw)


class _FusedLinearCEReduced(torch.autograd.Function):
    """sum/mean reductions: gradients are computed during forward, backward only rescales them."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        scale: torch.Tensor,
        ignore_index: int,
        z_loss_weight: float,
        chunk_size: int,
        compute_dtype: torch.dtype,
        grad_enabled: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, _ = x.shape
        # only the gradients autograd will ask for (none under no_grad; no weight grad for a frozen head)
        need = [grad_enabled and bool(ctx.needs_input_grad[i]) for i in range(3)]
        with torch.autocast(x.device.type, enabled=False):
            w_c = weight.to(compute_dtype)
            b_c = bias.to(compute_dtype) if bias is not None else None
            grad_x = torch.empty(x.shape, dtype=compute_dtype, device=x.device) if need[0] else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need[1] else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=x.device) if need[2] else None
            ce_sum = torch.zeros((), dtype=torch.float32, device=x.device)
            z_sum = torch.zeros((), dtype=torch.float32, device=x.device)
            scale32 = scale.to(device=x.device, dtype=torch.float32)
            ws = _Workspace(min(chunk_size, n), weight.shape[0], x.shape[1], compute_dtype, x.device)
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                x_c = x[start:end].to(compute_dtype)
                t = target[start:end]
                valid = t != ignore_index
                t = torch.where(valid, t, 0)
                row_scale = valid.to(torch.float32) * scale32
                ce, lse, grad = _chunk_grad_logits(ws.logits(x_c, w_c, b_c), t, row_scale, z_loss_weight)
                ce_sum += torch.where(valid, ce, 0.0).sum()
                if z_loss_weight:
                    z_sum += torch.where(valid, lse * lse, 0.0).sum()
                ws.contract(grad, x_c, w_c, grad_x[start:end] if grad_x is not None else None, grad_w, grad_b)
            del ws
        z_term = z_sum * (z_loss_weight * scale32)
        loss = ce_sum * scale32 + z_term
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(z_term)
        return loss, z_term

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_z: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        grad_x, grad_w, grad_b = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g = grad_loss.to(torch.float32)
        gx = (grad_x * g.to(grad_x.dtype)).to(x_dtype) if grad_x is not None else None
        gw = (grad_w * g).to(w_dtype) if grad_w is not None else None
        gb = (grad_b * g).to(b_dtype) if grad_b is not None else None
        return gx, gw, gb, None, None, None, None, None, None, None


class _FusedLinearCEUnreduced(torch.autograd.Function):
    """reduction='none': per-token upstream grads are unknown in forward, so backward recomputes chunks."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        ignore_index: int,
        z_loss_weight: float,
        chunk_size: int,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        n = x.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=x.device)
        lse_all = torch.empty(n, dtype=torch.float32, device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            w_c = weight.to(compute_dtype)
            b_c = bias.to(compute_dtype) if bias is not None else None
            ws = _Workspace(min(chunk_size, n), weight.shape[0], x.shape[1], compute_dtype, x.device)
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                t = target[start:end]
                valid = t != ignore_index
                logits = ws.logits(x[start:end].to(compute_dtype), w_c, b_c)
                lse = torch.logsumexp(logits, dim=-1)
                tgt = logits.gather(1, torch.where(valid, t, 0).unsqueeze(1)).squeeze(1)
                per = lse - tgt + (z_loss_weight * lse * lse if z_loss_weight else 0.0)
                losses[start:end] = torch.where(valid, per, 0.0)
                lse_all[start:end] = lse
            del ws
        ctx.save_for_backward(x, weight, bias, target, lse_all)
        ctx.cfg = (ignore_index, z_loss_weight, chunk_size, compute_dtype)
        return losses

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, weight, bias, target, lse_all = ctx.saved_tensors
        ignore_index, z_loss_weight, chunk_size, compute_dtype = ctx.cfg
        n = x.shape[0]
        with torch.autocast(x.device.type, enabled=False):
            w_c = weight.to(compute_dtype)
            b_c = bias.to(compute_dtype) if bias is not None else None
            grad_x = torch.empty(x.shape, dtype=compute_dtype, device=x.device)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
            grad_b = (
                torch.zeros(bias.shape, dtype=torch.float32, device=x.device) if bias is not None else None
            )
            g_all = grad_out.to(torch.float32)
            ws = _Workspace(min(chunk_size, n), weight.shape[0], x.shape[1], compute_dtype, x.device)
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                x_c = x[start:end].to(compute_dtype)
                t = target[start:end]
                valid = t != ignore_index
                row_scale = valid.to(torch.float32) * g_all[start:end]
                logits = ws.logits(x_c, w_c, b_c)
                _, _, grad = _chunk_grad_logits(
                    logits, torch.where(valid, t, 0), row_scale, z_loss_weight, lse=lse_all[start:end]
                )
                ws.contract(grad, x_c, w_c, grad_x[start:end], grad_w, grad_b)
            del ws
        gb = grad_b.to(bias.dtype) if bias is not None else None
        return grad_x.to(x.dtype), grad_w.to(weight.dtype), gb, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Optional Liger-Kernel fast path (CUDA only).
_LIGER_STATE: dict[str, Any] = {}


def _liger_loss_cls() -> Any:
    if "cls" not in _LIGER_STATE:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except Exception:  # ImportError, or a Triton/CUDA mismatch raising at import time
            LigerFusedLinearCrossEntropyLoss = None
        _LIGER_STATE["cls"] = LigerFusedLinearCrossEntropyLoss
    return _LIGER_STATE["cls"]


def _liger_fused_ce(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int,
    reduction: str,
    z_loss_weight: float,
) -> torch.Tensor | None:
    cls = _liger_loss_cls()
    if cls is None:
        return None
    try:
        fn = cls(ignore_index=ignore_index, lse_square_scale=z_loss_weight, reduction=reduction)
        out = fn(weight, x, target, bias)
    except TypeError as exc:  # API drift between Liger versions: fall back loudly, not silently
        warnings.warn(
            f"overdrive: Liger fused CE call failed ({exc}); using the PyTorch chunked kernel.", stacklevel=3
        )
        _LIGER_STATE["cls"] = None
        return None
    return out[0] if isinstance(out, tuple) else out


# ----------------------------------------------------------------------------------------------
def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    z_loss_weight: float = 0.0,
    chunk_size: int | None = None,
    return_z_loss: bool = False,
    use_liger: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """cross_entropy(hidden @ weight.T + bias, target) without building the full logits.

    Args:
        hidden: ``[..., H]`` activations (any float dtype; autocast is honoured like ``nn.Linear``).
        weight: ``[V, H]`` lm_head weight; its gradient is accumulated in fp32 across chunks.
        target: ``[...]`` class indices; ``ignore_index`` rows contribute neither loss nor gradient.
        reduction: ``mean`` (over non-ignored tokens), ``sum`` or ``none`` (fp32 per-token losses).
        num_items_in_batch: HF Trainer semantics: when given (and reduction != none) the loss is the
            *sum* divided by this count, so gradient accumulation over micro-batches averages over
            all target tokens of the global batch instead of averaging per-micro-batch means.
        z_loss_weight: adds ``z_loss_weight * logsumexp(logits)**2`` per token (PaLM-style z-loss).
        return_z_loss: also return the (detached) z-loss part of the loss.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    h = hidden.shape[-1]
    x = hidden.reshape(-1, h)
    t = target.reshape(-1).to(device=x.device)
    if t.shape[0] != x.shape[0]:
        raise ValueError(f"hidden has {x.shape[0]} tokens but target has {t.shape[0]}")
    n, vocab = x.shape[0], weight.shape[0]
    eff_reduction = "sum" if (num_items_in_batch is not None and reduction != "none") else reduction

    if use_liger and x.is_cuda and not return_z_loss:
        out = _liger_fused_ce(x, weight, bias, t, ignore_index, eff_reduction, z_loss_weight)
        if out is not None:
            if eff_reduction == "none":
                return out.reshape(target.shape)
            return out / _as_tensor(num_items_in_batch, out) if num_items_in_batch is not None else out

    chunk = chunk_size or default_chunk_size(n, vocab, h, x.device.type)
    cdtype = _compute_dtype(x)
    if eff_reduction == "none":
        losses = _FusedLinearCEUnreduced.apply(x, weight, bias, t, ignore_index, z_loss_weight, chunk, cdtype)
        losses = losses.reshape(target.shape)
        return (losses, losses.new_zeros(())) if return_z_loss else losses
    if num_items_in_batch is not None:
        scale = 1.0 / _as_tensor(num_items_in_batch, x).to(torch.float32)
    elif eff_reduction == "mean":
        scale = 1.0 / (t != ignore_index).sum().to(torch.float32)
    else:
        scale = torch.ones((), dtype=torch.float32, device=x.device)
    loss, z = _FusedLinearCEReduced.apply(
        x, weight, bias, t, scale, ignore_index, z_loss_weight, chunk, cdtype, torch.is_grad_enabled()
    )
    return (loss, z) if return_z_loss else loss


def _as_tensor(value: int | float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if torch.is_tensor(value):
        return value.to(device=like.device)
    return torch.tensor(value, device=like.device)


def reference_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    z_loss_weight: float = 0.0,
) -> torch.Tensor:
    """The naive path (full logits, fp32 upcast) exactly as HF computes it; used by tests and benchmarks."""
    logits = F.linear(hidden, weight, bias).float()
    logits = logits.reshape(-1, logits.shape[-1])
    t = target.reshape(-1)
    red = "sum" if (num_items_in_batch is not None and reduction != "none") else reduction
    loss = F.cross_entropy(logits, t, ignore_index=ignore_index, reduction=red)
    if z_loss_weight:
        valid = (t != ignore_index).float()
        z = torch.logsumexp(logits, dim=-1).pow(2) * valid * z_loss_weight
        loss = loss + (z if red == "none" else z.sum() / (valid.sum() if red == "mean" else 1.0))
    if red == "none":
        return loss.reshape(target.shape)
    if num_items_in_batch is not None:
        loss = loss / _as_tensor(num_items_in_batch, loss)
    return loss


def shift_labels_for_causal_lm(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """HF's shift: token t predicts label t+1; the last position gets ``ignore_index``."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def fused_causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: nn.Linear,
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
    **kwargs: Any,
) -> torch.Tensor:
    """Drop-in for ``ForCausalLMLoss(lm_head(hidden_states), labels, ...)`` without the logits."""
    if shift_labels is None:
        if labels is None:
            raise ValueError("either labels or shift_labels is required")
        shift_labels = shift_labels_for_causal_lm(labels, ignore_index)
    return fused_linear_cross_entropy(
        hidden_states,
        lm_head.weight,
        shift_labels,
        lm_head.bias,
        ignore_index=ignore_index,
        reduction="mean",
        num_items_in_batch=num_items_in_batch,
        **kwargs,
    )


class FusedLinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`fused_linear_cross_entropy` (``loss = mod(hidden, lm_head.weight, target)``)."""

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        z_loss_weight: float = 0.0,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.z_loss_weight = z_loss_weight
        self.chunk_size = chunk_size

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = fused_linear_cross_entropy(
            hidden,
            weight,
            target,
            bias,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            num_items_in_batch=num_items_in_batch,
            z_loss_weight=self.z_loss_weight,
            chunk_size=self.chunk_size,
        )
        assert isinstance(out, torch.Tensor)
        return out
