"""--optimizer: every choice trains, the memory-saving ones keep less state, bad combinations fail early."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from overdrive.cli import main
from overdrive.config import TrainConfig
from overdrive.errors import UsageError
from overdrive.metrics import read_metrics
from overdrive.modeling import preset_config
from overdrive.train.optim import galore_targets, make_optimizer, optimizer_state_bytes
from tests.conftest import MICRO_LLAMA, cli_error, micro_args

OPTIMIZERS = ["adamw", "adamw-8bit", "paged-adamw-8bit", "galore-adamw", "adafactor", "sgd"]
# SGD has no per-parameter normalisation: it needs a learning rate far above AdamW's
EXTRA = {"galore-adamw": ["--galore-rank", "16"], "sgd": ["--learning-rate", "0.5"]}


def micro_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**MICRO_LLAMA))


def tiny_model(vocab_size: int = 8000) -> LlamaForCausalLM:
    """The `tiny` preset as `overdrive train` builds it: the vocabulary of its default 8000-token BPE."""
    config = preset_config("tiny")
    config.vocab_size = vocab_size
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def one_step(model: LlamaForCausalLM, optimizer: torch.optim.Optimizer, seed: int = 1) -> None:
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_trains_20_steps_with_falling_loss(name, micro_config, text_file, tmp_path) -> None:
    out = tmp_path / name
    argv = micro_args(micro_config, text_file, out, "--max-steps", "20", "--logging-steps", "1")
    assert main([*argv, "--optimizer", name, *EXTRA.get(name, [])]) == 0
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.1, (name, losses)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_eval_loss"] < summary["first_eval_loss"] - 0.1
    assert summary["config"]["optimizer"] == name
    assert summary["optimizer_state_bytes"] > 0


def test_default_adamw_is_the_fused_torch_adamw_unchanged() -> None:
    """The default is torch's AdamW with the two decay groups, step for step the same as built by hand."""
    cfg = TrainConfig()
    model, reference = micro_model(), micro_model()
    optimizer = make_optimizer(model, cfg)
    assert type(optimizer) is torch.optim.AdamW
    decay = [p for p in reference.parameters() if p.ndim >= 2]
    no_decay = [p for p in reference.parameters() if p.ndim < 2]
    expected = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=optimizer.defaults["fused"],
        foreach=optimizer.defaults["foreach"],
    )
    assert [len(g["params"]) for g in optimizer.param_groups] == [len(decay), len(no_decay)]
    for seed in range(3):
        one_step(model, optimizer, seed)
        one_step(reference, expected, seed)
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_every_optimizer_keeps_norms_and_biases_undecayed() -> None:
    for name in OPTIMIZERS:
        model = micro_model()
        optimizer = make_optimizer(model, TrainConfig(optimizer=name, galore_rank=8))
        for group in optimizer.param_groups:
            if group["weight_decay"] > 0:
                assert all(p.ndim >= 2 for p in group["params"]), name
        decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        assert decayed == {id(p) for p in model.parameters() if p.ndim >= 2}, name


def test_state_bytes_8bit_and_galore_against_adamw_on_tiny() -> None:
    """8-bit AdamW <= 0.3x AdamW's state; GaLore rank 16 on attention/MLP projections <= 0.6x (tiny preset)."""
    measured = {}
    for name in ("adamw", "adamw-8bit", "paged-adamw-8bit", "galore-adamw"):
        model = tiny_model()
        optimizer = make_optimizer(model, TrainConfig(optimizer=name, galore_rank=16))
        one_step(model, optimizer)
        measured[name] = optimizer_state_bytes(optimizer)
        if name == "adamw-8bit":
            q_proj = model.model.layers[0].self_attn.q_proj.weight
            assert optimizer.state[q_proj]["state1"].dtype == torch.uint8
        if name == "galore-adamw":
            up = model.model.layers[0].mlp.up_proj.weight  # 688 x 256: the projected state is 688 x 16
            assert optimizer.state[up]["exp_avg"].shape == (688, 16)
    n_params = sum(p.numel() for p in tiny_model().parameters())
    assert measured["adamw"] >= 2 * 4 * n_params  # two fp32 moments per parameter
    assert measured["adamw-8bit"] <= 0.3 * measured["adamw"], measured
    assert measured["paged-adamw-8bit"] <= 0.3 * measured["adamw"], measured
    assert measured["galore-adamw"] <= 0.6 * measured["adamw"], measured


def test_state_bytes_counts_local_tensors_once() -> None:
    model = micro_model()
    optimizer = make_optimizer(model, TrainConfig(optimizer="sgd"))
    one_step(model, optimizer)
    expected = sum(p.numel() * 4 for p in model.parameters())  # one fp32 momentum buffer each
    assert optimizer_state_bytes(optimizer) == expected


def test_galore_targets_the_attention_and_mlp_projections() -> None:
    model = micro_model()
    found = {id(p) for p in galore_targets(model, "attn,mlp")}
    names = {n for n, p in model.named_parameters() if id(p) in found}
    assert len(names) == 2 * 7 and all(n.endswith("_proj.weight") for n in names)
    assert {n for n in names if "q_proj" in n} == {
        f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)
    }
    with pytest.raises(UsageError, match="matches no linear layer"):
        make_optimizer(model, TrainConfig(optimizer="galore-adamw", galore_target="conv"))


@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_galore_checkpoint_loads_weights_only_and_continues_exactly(proj_type) -> None:
    """The projector is stored as tensors; a resumed optimizer takes the same next step as the original."""
    cfg = TrainConfig(
        optimizer="galore-adamw", galore_rank=8, galore_update_gap=2, galore_proj_type=proj_type
    )
    model = micro_model()
    optimizer = make_optimizer(model, cfg)
    for seed in range(3):
        one_step(model, optimizer, seed)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed_model = copy.deepcopy(model)
    resumed = make_optimizer(resumed_model, cfg)
    resumed.load_state_dict(state)
    for seed in (3, 4):  # step 4 refreshes the projection (gap 2)
        one_step(model, optimizer, seed)
        one_step(resumed_model, resumed, seed)
    for (name, a), b in zip(model.named_parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert any("projector" in s for s in resumed.state.values())


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--optimizer", "adamw-8bit", "--strategy", "fsdp"], "cannot run under fsdp"),
        (["--optimizer", "paged-adamw-8bit", "--strategy", "zero3"], "cannot run under fsdp"),
        (["--optimizer", "galore-adamw", "--strategy", "tp"], "tensor parallelism"),
        (["--optimizer", "galore-adamw", "--strategy", "fsdp-tp"], "cannot run under fsdp"),
        (["--optimizer", "adamw-8bit", "--strategy", "deepspeed-zero2"], "deepspeed engine"),
        (["--optimizer", "galore-adamw", "--strategy", "deepspeed-zero3"], "deepspeed engine"),
        (["--galore-rank", "16"], "--galore-rank applies to --optimizer galore-adamw only"),
        (["--galore-target", "attn"], "--galore-target applies to --optimizer galore-adamw only"),
        (["--optimizer", "galore-adamw", "--galore-rank", "0"], "--galore-rank must be positive"),
        (
            ["--optimizer", "galore-adamw", "--galore-update-gap", "-1"],
            "--galore-update-gap must be positive",
        ),
        (["--optimizer", "galore-adamw", "--galore-scale", "0"], "--galore-scale must be positive"),
        (["--optimizer", "galore-adamw", "--galore-target", " , "], "--galore-target is empty"),
        (["--optimizer", "sgd", "--sgd-momentum", "1"], "--sgd-momentum must be in [0, 1)"),
    ],
)
def test_bad_optimizer_combinations_exit_2_with_one_line(
    extra, needle, micro_config, text_file, tmp_path, capsys
) -> None:
    out = tmp_path / "run"
    err = cli_error(micro_args(micro_config, text_file, out, *extra), capsys)
    assert needle in err
    assert not out.exists()


def test_galore_target_matching_nothing_fails_before_the_run_writes(
    micro_config, text_file, tmp_path, capsys
) -> None:
    out = tmp_path / "run"
    argv = micro_args(micro_config, text_file, out, "--optimizer", "galore-adamw", "--galore-target", "conv")
    err = cli_error(argv, capsys)
    assert "--galore-target 'conv' matches no linear layer" in err
    assert not out.exists()


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize(("warmup", "total", "min_ratio"), [(0, 10, 0.0), (3, 20, 0.1), (5, 5, 0.0), (2, 7, 0.5)])
def test_schedules_are_hf_trainers_step_for_step(kind, warmup, total, min_ratio) -> None:
    """overdrive's LambdaLR schedules give transformers.get_scheduler's lr at every step, past the end too,
    and the same state-dict shape (checkpoints from either load in the other)."""
    from transformers import get_scheduler

    from overdrive.train.optim import make_scheduler

    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=3e-4)

    cfg = TrainConfig(lr_scheduler=kind, warmup_steps=warmup, min_lr_ratio=min_ratio)
    mine = make_scheduler(optimizer(), cfg, total)
    hf_name = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}[kind]
    extra = {"scheduler_specific_kwargs": {"min_lr_rate": min_ratio}} if kind == "cosine" else {}
    theirs = get_scheduler(hf_name, optimizer(), num_warmup_steps=warmup, num_training_steps=total, **extra)
    for step in range(total + 3):
        assert mine.get_last_lr() == theirs.get_last_lr(), (step, mine.get_last_lr(), theirs.get_last_lr())
        mine.optimizer.step()
        theirs.optimizer.step()
        mine.step()
        theirs.step()
    assert mine.state_dict().keys() == theirs.state_dict().keys()
    assert mine.state_dict()["lr_lambdas"] == theirs.state_dict()["lr_lambdas"]
