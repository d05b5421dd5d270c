"""Pure-PyTorch training kernels (CPU-capable, ``torch.compile``-friendly), Liger/Triton on CUDA when present.

Each module documents the HF code it replaces and why; ``overdrive.patches`` swaps them into models.
"""

from __future__ import annotations

from overdrive.kernels.attention import (
    VARLEN_ATTENTION_NAME,
    cu_seqlens_from_position_ids,
    document_ids_from_position_ids,
    flash_varlen_kwargs,
    register_varlen_attention,
    varlen_sdpa_attention,
)
from overdrive.kernels.compile import compile_model, compile_regions
from overdrive.kernels.fused_linear_cross_entropy import (
    FusedLinearCrossEntropyLoss,
    fused_causal_lm_loss,
    fused_linear_cross_entropy,
)
from overdrive.kernels.rms_norm import rms_norm
from overdrive.kernels.rope import apply_rotary_pos_emb
from overdrive.kernels.swiglu import swiglu, swiglu_mlp

__all__ = [
    "VARLEN_ATTENTION_NAME",
    "FusedLinearCrossEntropyLoss",
    "apply_rotary_pos_emb",
    "compile_model",
    "compile_regions",
    "cu_seqlens_from_position_ids",
    "document_ids_from_position_ids",
    "flash_varlen_kwargs",
    "fused_causal_lm_loss",
    "fused_linear_cross_entropy",
    "register_varlen_attention",
    "rms_norm",
    "swiglu",
    "swiglu_mlp",
    "varlen_sdpa_attention",
]
