"""Pipeline splitting without a process group: stage modules chained by hand equal the whole HF model.

The stages of a split model, run one after another in one process (first: token ids -> hidden states, ...,
last: hidden states -> loss), must give the unsplit model's loss and gradients: fp32, same weights, the same
operations in the same order, so agreement is to float rounding (1e-6). Also: the auto split balances
parameters, explicit splits and bad degrees give one line, and the strategy checks pipeline combinations.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from overdrive.errors import UsageError
from overdrive.parallel import Strategy
from overdrive.parallel.materialize import build_meta_model, materialize, meta_reference
from overdrive.parallel.pipeline import (
    StageSpec,
    bubble_fraction,
    build_stage,
    check_pipeline,
    split_layers,
    stage_costs,
    stages_of_rank,
)

TOL = 1e-6


def config(tied: bool, layers: int = 4) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )


def whole_and_stages(tied: bool, ranges: list[range]):
    """The filled whole model and its stages filled from the same seed (as every layout is)."""
    model = build_meta_model(config(tied), "sdpa", "float32")
    reference = meta_reference(model)
    stages = [build_stage(model, StageSpec(i, len(ranges), r)) for i, r in enumerate(ranges)]
    for stage in stages:
        materialize(stage, reference, seed=3, device="cpu")
    materialize(model, reference, seed=3, device="cpu")
    return model, stages


def batch(documents: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 24), generator=g)
    out = {"input_ids": ids, "labels": ids.clone()}
    if documents:
        pos = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)
        out["position_ids"] = pos
        out["labels"][pos == 0] = -100
    return out


def chained_loss(stages, data: dict[str, torch.Tensor], num_items: int) -> torch.Tensor:
    kwargs = {k: data[k] for k in ("position_ids", "labels") if k in data}
    x = data["input_ids"]
    for stage in stages:
        stage.__dict__["_overdrive_pipeline_stage"].num_items = num_items
        x = stage(x, **kwargs)
    return x.sum()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("documents", [False, True], ids=["concat", "documents"])
def test_chained_stages_equal_the_whole_model(tied: bool, documents: bool) -> None:
    model, stages = whole_and_stages(tied, [range(0, 1), range(1, 3), range(3, 4)])
    data = batch(documents)
    n = int((data["labels"][:, 1:] != -100).sum())
    expected = model(**data, num_items_in_batch=n).loss
    got = chained_loss(stages, data, n)
    assert abs(got.detach().item() - expected.detach().item()) <= TOL * abs(expected.detach().item())
    expected.backward()
    got.backward()
    whole = dict(model.named_parameters())
    seen = set()
    for stage in stages:
        for name, p in stage.named_parameters():
            ref = whole[name].grad
            if name == "model.embed_tokens.weight" and tied:
                seen.add(id(p))
                continue  # each stage holds one use of the tied matrix; the engine adds them (below)
            scale = ref.abs().max().item()
            assert (p.grad - ref).abs().max().item() <= TOL * max(scale, 1e-12), name
    if tied:  # first stage's embedding gradient + last stage's lm_head gradient = the tied gradient
        first = stages[0].get_input_embeddings().weight.grad
        last = stages[-1].get_input_embeddings().weight.grad
        ref = whole["model.embed_tokens.weight"].grad
        assert torch.allclose(first + last, ref, atol=TOL * ref.abs().max().item())


def test_stage_modules_keep_the_full_models_names() -> None:
    model, stages = whole_and_stages(tied=False, ranges=[range(0, 2), range(2, 4)])
    names = [set(s.state_dict()) for s in stages]
    assert (
        "model.layers.2.mlp.up_proj.weight" in names[1]
        and "model.layers.2.mlp.up_proj.weight" not in names[0]
    )
    assert "model.embed_tokens.weight" in names[0] and "model.embed_tokens.weight" not in names[1]
    assert "lm_head.weight" in names[1] and "model.norm.weight" in names[1]
    assert "lm_head.weight" not in names[0] and "model.norm.weight" not in names[0]
    assert names[0] | names[1] == set(model.state_dict())


def test_tied_last_stage_keeps_the_embedding_for_its_head() -> None:
    _, stages = whole_and_stages(tied=True, ranges=[range(0, 2), range(2, 4)])
    last = stages[-1]
    assert last.lm_head.weight is last.get_input_embeddings().weight
    assert stages[0].lm_head is None


def test_auto_split_balances_parameters() -> None:
    model = build_meta_model(config(tied=False, layers=8), "sdpa", "float32")
    per_layer, embed, head = stage_costs(model)
    ranges = split_layers(8, 2, "auto", (per_layer, embed, head))
    assert [len(r) for r in ranges] == [4, 4]  # embedding and head weigh the same here
    heavy_head = split_layers(8, 2, "auto", (per_layer, 0, 3 * per_layer[0]))
    assert [len(r) for r in heavy_head] == [5, 3], "the stage with lm_head gets fewer layers"
    assert split_layers(8, 4, [1, 2, 3], (per_layer, 0, 0)) == [
        range(0, 1),
        range(1, 2),
        range(2, 3),
        range(3, 8),
    ]
    assert [len(r) for r in split_layers(8, 8, "auto", (per_layer, embed, head))] == [1] * 8


@pytest.mark.parametrize(
    "stages, split, message",
    [
        (5, "auto", "5 pipeline stages need at least 5 decoder layers but the model has 4"),
        (2, [1, 2], "pipeline_split [1, 2] must list 1 first-layer indices below 4 for 2 stages"),
        (2, [4], "pipeline_split [4] must list 1 first-layer indices below 4"),
    ],
)
def test_pipeline_checks_name_the_fix(stages: int, split, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_pipeline(config(tied=False), stages, split)


def test_stage_placement_per_schedule() -> None:
    assert stages_of_rank(0, 2, 1, "1f1b") == [0]
    assert stages_of_rank(1, 2, 2, "interleaved-1f1b") == [1, 3]
    assert stages_of_rank(0, 2, 2, "zbv-zero-bubble") == [0, 3]  # V shape: first and last on rank 0
    assert stages_of_rank(1, 2, 2, "zbv-zero-bubble") == [1, 2]


def test_bubble_fraction() -> None:
    assert bubble_fraction("1f1b", 1, 8) == 0.0
    assert bubble_fraction("1f1b", 4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction("interleaved-1f1b", 4, 8, virtual=2) == pytest.approx(1.5 / 9.5)


@pytest.mark.parametrize(
    "data, world, message",
    [
        ({"pipeline_parallel": 2, "data_parallel": "ddp"}, 4, "pipeline_parallel with ddp is not supported"),
        ({"pipeline_parallel": 2, "engine": "deepspeed", "data_parallel": "ddp"}, 2, "not deepspeed"),
        ({"pipeline_parallel": 2, "virtual_stages": 2}, 2, "1f1b runs one stage per rank"),
        (
            {"pipeline_parallel": 2, "pipeline_schedule": "interleaved-1f1b"},
            2,
            "set virtual_stages: 2 or more",
        ),
        (
            {"pipeline_parallel": 2, "pipeline_schedule": "zbv-zero-bubble", "virtual_stages": 3},
            2,
            "exactly 2 stages per rank",
        ),
        ({"pipeline_parallel": 3}, 2, "must divide the world size 2"),
        ({"pipeline_parallel": 2}, 4, "data_parallel: none runs one data-parallel rank"),
        ({"virtual_stages": 2}, 1, "apply with pipeline_parallel > 1 only"),
        ({"pipeline_parallel": 2, "pipeline_split": [2, 1]}, 2, "must list increasing layer indices"),
        ({"pipeline_parallel": 2, "pipeline_split": "even"}, 2, "must be auto or a list"),
    ],
)
def test_strategy_rejects_pipeline_combinations(data: dict, world: int, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        Strategy.from_dict(data).validate(world)


def test_micro_batches_must_fill_the_pipeline() -> None:
    strategy = Strategy.from_dict({"pipeline_parallel": 4, "data_parallel": "none"})
    assert strategy.resolve_batch(8, 1, 2) == (2, 4)
    with pytest.raises(
        UsageError, match="needs at least 4 micro-batches per step but the global batch gives 2"
    ):
        strategy.resolve_batch(8, 1, 4)


def test_presets_resolve_their_mesh() -> None:
    pp = Strategy.from_name_or_path("pp")
    assert pp.parallel_dims(2).pp == 2 and pp.resolved_for(2).pipeline_parallel == 2
    dims = Strategy.from_name_or_path("pp-fsdp").parallel_dims(4)
    assert (dims.pp, dims.dp_shard, dims.tp) == (2, 2, 1)
    assert Strategy.from_name_or_path("pp-fsdp").resolved_reshard_after_forward is False
    assert Strategy.from_dict({"data_parallel": "fsdp"}).resolved_reshard_after_forward is True
    assert "pipeline 2 (1f1b)" in Strategy.from_dict({"pipeline_parallel": 2}).describe()
