"""NEFTune: uniform noise on the input embeddings while training (Jain et al., 2023, "NEFTune: Noisy
Embeddings Improve Instruction Finetuning").

The noise is U(-1, 1) · alpha / sqrt(L · d) (L the sequence length, d the hidden size), added by a forward hook
on the module `get_input_embeddings()` returns. The hook lives on the module, not on its parameters, so it
survives the model being built on the meta device and filled later, and wrappers that keep the module (DDP,
FSDP2, tensor parallelism, DeepSpeed). It adds nothing when the module is in eval mode or gradients are off
(evaluation, `generate`), so those paths give exactly what the model gives without NEFTune.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def neftune_scale(alpha: float, seq_len: int, hidden: int) -> float:
    """The bound of the noise: |noise| <= alpha / sqrt(L · d)."""
    return alpha / math.sqrt(seq_len * hidden)


def apply_neftune(model: nn.Module, alpha: float | None) -> RemovableHandle | None:
    """Hook NEFTune noise of `alpha` onto the model's input embeddings; None or 0 leaves the model as it is.

    Register it after tensor parallelism has hooked the embedding, so the noise is added to the embedding's
    final (reduced) output and not to a partial sum.
    """
    if not alpha:
        return None
    embeddings = model.get_input_embeddings()
    if embeddings is None:
        return None  # a pipeline stage without the embedding: the first stage adds the noise

    def add_noise(module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not (module.training and torch.is_grad_enabled()):
            return None
        seq_len, hidden = output.shape[-2], output.shape[-1]
        scale = neftune_scale(alpha, seq_len, hidden)
        return output + torch.empty_like(output).uniform_(-scale, scale)

    return embeddings.register_forward_hook(add_noise)
