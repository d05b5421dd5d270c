"""Batches in an order that does not depend on the world size.

Step t of the run always consumes the same `global_batch_size` samples: the ones at positions
[t*G, (t+1)*G) of a permutation drawn per epoch from the run's seed. Rank r of W takes the contiguous slice
[r*G/W, (r+1)*G/W) of that global batch and splits it into micro-batches. So one process with accumulation and
W processes see exactly the same samples at every step, and loss curves are comparable across strategies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch splits over ranks and micro-batches."""

    global_batch_size: int
    micro_batch_size: int
    world_size: int = 1

    @property
    def per_rank(self) -> int:
        return self.global_batch_size // self.world_size

    @property
    def accumulation_steps(self) -> int:
        return self.per_rank // self.micro_batch_size


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


def global_batch_indices(num_samples: int, plan: BatchPlan, seed: int, step: int) -> list[int]:
    """Sample indices of global batch `step` (0-based); each epoch drops its incomplete tail."""
    steps_per_epoch = num_samples // plan.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError("dataset smaller than one global batch")
    epoch, within = divmod(step, steps_per_epoch)
    perm = epoch_permutation(num_samples, seed, epoch)
    start = within * plan.global_batch_size
    return perm[start : start + plan.global_batch_size].tolist()


def rank_micro_batches(indices: Sequence[int], plan: BatchPlan, rank: int) -> list[list[int]]:
    """This rank's share of a global batch, split into micro-batches."""
    share = list(indices[rank * plan.per_rank : (rank + 1) * plan.per_rank])
    m = plan.micro_batch_size
    return [share[i : i + m] for i in range(0, len(share), m)]


MODEL_INPUTS = ("input_ids", "labels", "position_ids")


def collate(columns: dict[str, Sequence[Sequence[int]]]) -> dict[str, torch.Tensor]:
    """Columns of equal-length rows (fixed block size) -> tensors. position_ids travel only for packed data."""
    return {k: torch.tensor(columns[k], dtype=torch.long) for k in MODEL_INPUTS if k in columns}


def count_target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that contribute to the loss: labels are shifted inside the model, so the first is never a target."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
