"""Bytes that one decoder layer keeps for backward, per token, as formulas of the config.

Derived by counting the tensors autograd saves in one HF Llama decoder layer (`saved_tensors_hooks`, distinct
storages, `tests/search/test_memory.py` re-counts them) with sdpa attention:

- RMSNorm (HF): its input x and `x·rsqrt` in fp32 (2h+1 with the rsqrt), and the normalised output in the
  matmul dtype as the q/k/v (or gate/up) input (h); bf16 autocast over fp32 weights casts it once per reading
  matmul (3 copies before attention, 2 before the MLP). overdrive's fused RMSNorm keeps x and the rsqrt only.
- attention: q and k after RoPE, v and the output in the matmul dtype (2·q + 2·kv), the log-sum-exp of the
  fused attention in fp32 (one per head); the o_proj input is a view of the output.
- MLP (HF): gate and up outputs, silu(gate) and the down_proj input (4·I); the fused SwiGLU recomputes silu (3·I).
- bf16 autocast also keeps the bf16 copy of each layer weight until backward.
- LoRA (frozen base): a frozen norm weight needs no `x·rsqrt` and a frozen matmul keeps no input, but each
  adapter's A keeps the (shared) input and its B the r-wide A output: the layer keeps its matmul inputs as
  before plus 7·r per token; the lm_head keeps no input.
- selective recompute keeps the layer input and the outputs of every matmul and of attention; full recompute
  keeps only the layer input (fp32 residual stream).

Under tensor parallelism the head, kv and intermediate dimensions are split; with sequence parallelism the
norm-side tensors are split by sequence while the all-gathered matmul inputs stay whole.
"""

from __future__ import annotations

from overdrive.search.layout import Layout
from overdrive.search.shape import ModelShape

F32 = 4


def autocast_copies(lay: Layout) -> bool:
    """bf16 autocast over fp32 weights casts a norm's output once per matmul that reads it."""
    return lay.compute_bytes == 2 and lay.param_dtype == "fp32"


def norm_bytes(shape: ModelShape, lay: Layout, readers: int = 1) -> float:
    """Per token: what one RMSNorm keeps and the input(s) of the `readers` matmuls that read its output."""
    h, t = shape.hidden, lay.tp
    split = t if lay.sequence_parallel else 1
    own = F32 * (h + 1) if lay.kernels or lay.lora_rank else F32 * (2 * h + 1)
    return own / split + lay.compute_bytes * h * (readers if autocast_copies(lay) else 1)


def attention_bytes(shape: ModelShape, lay: Layout) -> float:
    c, t = lay.compute_bytes, lay.tp
    return (c * (2 * shape.q_dim + 2 * shape.kv_dim) + F32 * shape.heads) / t


def mlp_bytes(shape: ModelShape, lay: Layout) -> float:
    kept = 3 if lay.kernels else 4
    return kept * lay.compute_bytes * shape.intermediate / lay.tp


def full_layer_bytes_per_token(shape: ModelShape, lay: Layout) -> float:
    """No recompute: everything the layer's backward reads."""
    return (
        norm_bytes(shape, lay, 3)
        + norm_bytes(shape, lay, 2)
        + attention_bytes(shape, lay)
        + mlp_bytes(shape, lay)
        + 7 * lay.lora_rank * lay.compute_bytes
    )


def input_bytes_per_token(shape: ModelShape, lay: Layout) -> float:
    """Full recompute: the checkpoint keeps the layer input (fp32 residual stream)."""
    return F32 * shape.hidden / (lay.tp if lay.sequence_parallel else 1)


def selective_bytes_per_token(shape: ModelShape, lay: Layout) -> float:
    """Selective recompute: the layer input plus every matmul and attention output."""
    c, t, h = lay.compute_bytes, lay.tp, shape.hidden
    sp = t if lay.sequence_parallel else 1
    qkv = c * (shape.q_dim + 2 * shape.kv_dim) / t
    attn = (c * shape.q_dim + F32 * shape.heads) / t
    row_outputs = 2 * c * h / sp  # o_proj and down_proj outputs (reduce-scattered under SP)
    mlp = 2 * c * shape.intermediate / t
    return input_bytes_per_token(shape, lay) + qkv + attn + row_outputs + mlp


def weight_cast_bytes(shape: ModelShape, lay: Layout) -> float:
    """Per layer, not per token: autocast's bf16 copies of fp32 weights live until the layer's backward."""
    if lay.compute_bytes == 2 and lay.param_dtype == "fp32":
        return 2 * shape.layer_matmul_params() / lay.tp
    return 0.0


def backward_work_bytes(shape: ModelShape, lay: Layout, tokens: int) -> float:
    """Extra bytes while one layer's MLP runs backward: the incoming residual gradient (fp32) and the MLP's two
    intermediate gradients (matmul dtype)."""
    sp = lay.tp if lay.sequence_parallel else 1
    return tokens * (F32 * shape.hidden / sp + 2 * lay.compute_bytes * shape.intermediate / lay.tp)


def rope_bytes(shape: ModelShape, seq: int) -> float:
    """cos and sin of the rotary embedding, computed once per forward and shared by every layer."""
    return 2 * F32 * seq * shape.head_dim


def final_norm_bytes_per_token(shape: ModelShape, lay: Layout) -> float:
    """The final norm; with the fused CE the lm_head input is not kept (the kernel keeps gradients instead)."""
    sp = lay.tp if lay.sequence_parallel else 1
    own = F32 * (shape.hidden + 1) if lay.kernels or lay.lora_rank else F32 * (2 * shape.hidden + 1)
    head_input = 0 if lay.kernels or lay.lora_rank else lay.compute_bytes * shape.hidden
    return own / sp + head_input
