"""Data order is a function of the step alone, not of the world size or micro-batch size."""

from __future__ import annotations

import torch

from overdrive.data.loader import BatchPlan, count_target_tokens, global_batch_indices, rank_micro_batches


def test_global_batch_is_the_same_for_any_world_size() -> None:
    n, seed = 103, 7
    for step in range(30):  # crosses several epochs
        one = BatchPlan(8, 2, world_size=1)
        two = BatchPlan(8, 2, world_size=2)
        idx = global_batch_indices(n, one, seed, step)
        assert idx == global_batch_indices(n, two, seed, step)
        single = [i for mb in rank_micro_batches(idx, one, 0) for i in mb]
        split = [i for r in range(2) for mb in rank_micro_batches(idx, two, r) for i in mb]
        assert single == split == idx
        assert len(set(idx)) == 8


def test_epochs_cover_the_data_without_repeats() -> None:
    plan = BatchPlan(4, 4)
    seen = [i for step in range(5) for i in global_batch_indices(21, plan, 0, step)]
    assert len(seen) == len(set(seen)) == 20
    assert global_batch_indices(21, plan, 0, 5) != global_batch_indices(21, plan, 0, 0)


def test_plan_counts_accumulation_steps() -> None:
    assert BatchPlan(8, 2, 2).accumulation_steps == 2


def test_count_target_tokens_skips_first_position_and_ignored() -> None:
    labels = torch.tensor([[5, 6, -100, 7], [-100, -100, 8, 9]])
    assert count_target_tokens({"labels": labels}) == 2 + 2
