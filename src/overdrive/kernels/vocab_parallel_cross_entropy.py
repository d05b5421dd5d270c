"""Fused lm_head + cross-entropy over a vocab-parallel lm_head (tensor parallelism), without logits.

Under tensor parallelism each rank holds `vocab / tp` rows of the lm_head weight. The unfused path builds
this rank's `[tokens × vocab / tp]` logits and runs `loss_parallel`; here the tokens go in chunks, and per
chunk the ranks agree on the row maximum and on the sum of exponentials and the target logit (two small
all-reduces of `[chunk]` vectors), so the loss is exact while no rank ever holds more than
`chunk × vocab / tp` logits. As in `fused_linear_cross_entropy`, the gradients of each chunk are computed in
the forward pass and contracted at once: this rank's weight gradient is complete (its own vocabulary rows),
the hidden-state gradient is this rank's share, summed over the TP group by DTensor in backward.

Reference (what this replaces, with HF's ForCausalLMLoss)::

    logits = lm_head(hidden)                              # DTensor, vocab-sharded
    loss = cross_entropy(logits.float().view(-1, V), shifted_labels.view(-1), ignore_index=-100,
                         reduction="sum" if num_items_in_batch else "mean") / (num_items_in_batch or 1)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from overdrive.kernels.fused_linear_cross_entropy import (
    _compute_dtype,
    default_chunk_size,
    shift_labels_for_causal_lm,
)

#: Set on an lm_head module whose weight is vocab-parallel (`overdrive.parallel.tensor`).
VOCAB_PARALLEL_ATTR = "_overdrive_vocab_parallel_lm_head"


def is_vocab_parallel_head(head: Any) -> bool:
    return isinstance(head, nn.Module) and bool(head.__dict__.get(VOCAB_PARALLEL_ATTR, False))


class _VocabParallelLinearCE(torch.autograd.Function):
    """sum_i scale_i * CE_i over rows of `hidden` [N, H] (replicated over `group`) with `weight` [V/tp, H]."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        row_scale: torch.Tensor,
        group: Any,
        vocab_start: int,
        chunk: int,
    ) -> torch.Tensor:
        dtype = _compute_dtype(hidden)
        w = weight.to(dtype)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = weight.shape[0]
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].to(dtype)
            t, scale = target[start : start + chunk], row_scale[start : start + chunk]
            logits = (h @ w.t()).float()
            mine = (t >= vocab_start) & (t < vocab_start + rows) & (scale != 0)
            index = (t - vocab_start).clamp(0, rows - 1)
            target_logit = logits.gather(1, index[:, None]).squeeze(1) * mine
            top = logits.max(dim=1).values
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            logits.sub_(top[:, None]).exp_()
            stats = torch.stack([logits.sum(dim=1), target_logit])
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
            total, target_logit = stats[0], stats[1]
            loss += ((total.log() + top - target_logit) * scale).sum()
            # d loss / d logits = scale * (softmax - onehot), in place of the exponentials
            logits.mul_((scale / total)[:, None])
            picked = mine.nonzero().squeeze(1)
            logits[picked, index[picked]] -= scale[picked]
            grad_logits = logits.to(dtype)
            if grad_h is not None:
                grad_h[start : start + chunk] = (grad_logits @ w).to(hidden.dtype)
            grad_w += (grad_logits.t() @ h).float()
        ctx.save_for_backward(grad_h if grad_h is not None else hidden.new_empty(0), grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = grad_w * grad_out.to(grad_w.dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None, None


def vocab_parallel_fused_causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: nn.Linear,
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
    **kwargs: Any,
) -> torch.Tensor:
    """Drop-in for HF's causal-LM loss of a vocab-parallel `lm_head` (DTensor weight `Shard(0)`), no logits.

    `hidden_states` is the DTensor residual stream (sequence-sharded or replicated) or a plain replicated
    tensor. Returns a plain scalar, the same on every rank of the TP group.
    """
    from torch.distributed.tensor import DTensor, Partial, Replicate

    weight = lm_head.weight
    mesh = weight.device_mesh
    if shift_labels is None:
        if labels is None:
            raise ValueError("either labels or shift_labels is required")
        shift_labels = shift_labels_for_causal_lm(labels, ignore_index)
    if not isinstance(hidden_states, DTensor):
        hidden_states = DTensor.from_local(hidden_states, mesh, [Replicate()], run_check=False)
    elif hidden_states.placements != (Replicate(),):
        hidden_states = hidden_states.redistribute(placements=[Replicate()])
    # each rank's hidden gradient covers its own vocabulary rows: partial, summed by DTensor in backward
    hidden = hidden_states.to_local(grad_placements=(Partial(),))
    hidden = hidden.reshape(-1, hidden.shape[-1])
    local_weight = weight.to_local()
    if local_weight.shape[0] * mesh.size() != weight.shape[0]:
        raise ValueError(f"vocabulary {weight.shape[0]} is not split evenly over {mesh.size()} ranks")
    target = shift_labels.reshape(-1).to(hidden.device)
    valid = target != ignore_index
    if num_items_in_batch is None:
        denominator = valid.sum().float()
    else:
        denominator = torch.as_tensor(num_items_in_batch, dtype=torch.float32).to(hidden.device)
    row_scale = valid.float() / denominator
    chunk = default_chunk_size(hidden.shape[0], local_weight.shape[0], hidden.shape[1], hidden.device.type)
    vocab_start = mesh.get_local_rank() * local_weight.shape[0]
    return _VocabParallelLinearCE.apply(
        hidden, local_weight, target, row_scale, mesh.get_group(), vocab_start, chunk
    )
