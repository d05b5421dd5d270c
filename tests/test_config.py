"""The resolved run configuration: run_clm.py flags as aliases, HF's global batch, YAML values.

Everything goes through `overdrive train ... --print-config` in-process, as a user would type it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from overdrive.cli import main
from overdrive.config import TrainConfig, validate
from overdrive.errors import UsageError

SEED_000 = Path(__file__).resolve().parents[2] / "shared" / "seeds"


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests set WORLD_SIZE themselves; one left over from a launcher would change every global batch."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def resolve(capsys: pytest.CaptureFixture[str], *flags: str) -> tuple[dict[str, Any], str]:
    """The config `overdrive train FLAGS` would run with, and what it printed on stderr."""
    capsys.readouterr()
    code = main(["train", *flags, "--print-config"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return yaml.safe_load(captured.out), captured.err


def seed_run_clm_args() -> list[str]:
    """The seed's Llama3-8B FSDP command (seeds/000), its shell variables filled in as the seed sets them."""
    return [
        "--num_train_epochs", "2",
        "--dataset_name", "wikitext",
        "--dataset_config_name", "wikitext-103-raw-v1",
        "--use_fast_tokenizer", "false",
        "--per_device_train_batch_size", "1",
        "--per_device_eval_batch_size", "1",
        "--do_train",
        "--output_dir", "/tmp/test-clm",
        "--overwrite_output_dir",
        "--config_name", "./Meta-Llama-3-8B/",
        "--tokenizer_name", "./Meta-Llama-3-8B/",
        "--trust_remote_code", "true",
        "--cache_dir", "./cache",
        "--block_size", "4096",
        "--optim", "adamw_torch",
        "--save_strategy", "no",
        "--logging_strategy", "steps",
        "--gradient_checkpointing", "no",
        "--logging_steps", "100",
        "--bf16=true",
        "--fsdp", "auto_wrap",
        "--fsdp_config", "llama3_fsdp_native.json",
    ]  # fmt: skip


def test_seed_args_match_the_seed_document() -> None:
    """The list above is the seed's command, not a paraphrase of it (checked where the seeds are present)."""
    seeds = sorted(SEED_000.glob("000_*.txt"))
    if not seeds:
        pytest.skip("seed documents not available in this checkout")
    text = seeds[0].read_text()
    assert 'PRECISION="bf16=true"' in text and "--$PRECISION" in text  # the seed's spelling of --bf16=true
    for flag in seed_run_clm_args():
        if flag.startswith("--") and flag != "--bf16=true":
            assert f"{flag} " in text, flag


def test_seed_run_clm_command_resolves_like_hf(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "8")  # what torchrun --nproc_per_node 8 gives every rank
    monkeypatch.setenv("RANK", "0")
    cfg, err = resolve(capsys, *seed_run_clm_args())
    expected = {
        "num_train_epochs": 2.0,
        "dataset": "wikitext",
        "dataset_config": "wikitext-103-raw-v1",
        "micro_batch_size": 1,
        "eval_batch_size": 1,
        "global_batch_size": 8,  # HF: 1 per device × 8 ranks × accumulation 1
        "gradient_accumulation_steps": 1,
        "output_dir": "/tmp/test-clm",
        "overwrite": True,
        "model_config": "./Meta-Llama-3-8B/",
        "tokenizer": "./Meta-Llama-3-8B/",
        "trust_remote_code": True,
        "cache_dir": "./cache",
        "block_size": 4096,
        "save_steps": None,
        "activation_checkpointing": False,
        "logging_steps": 100,
        "precision": "bf16",
        "strategy": "fsdp",
    }
    assert {k: cfg[k] for k in expected} == expected
    notes = err.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith("overdrive: note: "), err
    for ignored in ("--do_train", "--use_fast_tokenizer", "--fsdp_config"):
        assert ignored in notes[0]


ALIASES = [
    (["--model_name_or_path", "gpt2"], {"model": "gpt2"}),
    (["--config_name", "tiny"], {"model_config": "tiny"}),
    (["--tokenizer_name", "tok"], {"tokenizer": "tok"}),
    (
        ["--dataset_name", "wikitext", "--dataset_config_name", "raw"],
        {"dataset": "wikitext", "dataset_config": "raw"},
    ),
    (
        ["--train_file", "a.txt", "--validation_file", "b.txt"],
        {"train_file": "a.txt", "validation_file": "b.txt"},
    ),
    (["--block_size", "128"], {"block_size": 128}),
    (["--per_device_train_batch_size", "4"], {"micro_batch_size": 4, "global_batch_size": 4}),
    (["--per_device_eval_batch_size", "16"], {"eval_batch_size": 16}),
    (["--gradient_accumulation_steps", "3"], {"gradient_accumulation_steps": 3, "global_batch_size": 24}),
    (["--num_train_epochs", "1.5"], {"num_train_epochs": 1.5}),
    (["--max_steps", "7"], {"max_steps": 7}),
    (["--max_steps", "-1"], {"max_steps": None}),
    (["--learning_rate", "5e-5"], {"learning_rate": 5e-5}),
    (["--weight_decay", "0"], {"weight_decay": 0.0}),
    (["--warmup_steps", "30"], {"warmup_steps": 30, "warmup_ratio": 0.0}),
    (["--warmup_steps", "0.1"], {"warmup_steps": 0, "warmup_ratio": 0.1}),
    (["--warmup_ratio", "0.05"], {"warmup_ratio": 0.05}),
    (["--lr_scheduler_type", "linear"], {"lr_scheduler": "linear"}),
    (["--lr_scheduler_type", "cosine"], {"lr_scheduler": "cosine", "min_lr_ratio": 0.0}),
    (
        ["--lr_scheduler_type", "cosine", "--min-lr-ratio", "0.2"],
        {"lr_scheduler": "cosine", "min_lr_ratio": 0.2},
    ),
    (["--lr_scheduler_type", "constant"], {"lr_scheduler": "constant"}),
    (["--lr_scheduler_type", "constant_with_warmup"], {"lr_scheduler": "constant"}),
    (["--max_grad_norm", "0.5"], {"max_grad_norm": 0.5}),
    (["--fp16"], {"precision": "fp16"}),
    (["--gradient_checkpointing"], {"activation_checkpointing": True}),
    (["--seed", "7"], {"seed": 7}),
    (["--output_dir", "out"], {"output_dir": "out"}),
    (["--overwrite_output_dir"], {"overwrite": True}),
    (["--logging_steps", "50"], {"logging_steps": 50}),
    (["--save_steps", "200.0"], {"save_steps": 200}),
    (["--save_total_limit", "3"], {"save_total_limit": 3}),
    (["--eval_steps", "25"], {"eval_steps": 25}),
    (["--eval_strategy", "steps", "--eval_steps", "25"], {"eval_steps": 25}),
    (["--save_strategy", "steps"], {"save_steps": 500}),
    (["--save_strategy", "steps", "--save_steps", "20"], {"save_steps": 20}),
    (["--torch_compile"], {"compile": True}),
    (["--trust_remote_code"], {"trust_remote_code": True}),
    (["--cache_dir", "cache"], {"cache_dir": "cache"}),
    (["--optim", "adamw_torch"], {"learning_rate": 1e-3}),
    (["--optim", "adamw_torch_fused"], {"learning_rate": 1e-3}),
    (["--max_train_samples", "100"], {"max_train_samples": 100}),
    (["--max_eval_samples", "10"], {"max_eval_samples": 10}),
    (["--torch_dtype", "bfloat16"], {"dtype": "bfloat16"}),
    (["--fsdp", "full_shard auto_wrap"], {"strategy": "fsdp"}),
    (["--fsdp", "shard_grad_op"], {"strategy": "zero2"}),
    (["--fsdp", "full_shard offload auto_wrap"], {"strategy": "zero3-offload"}),
    (["--fsdp", "false"], {"strategy": None}),
    (["--validation_split_percentage", "10"], {"validation_split_percentage": 10}),
    (["--report_to", "none"], {"report_to": "none"}),
    (["--report-to", "none"], {"report_to": "none"}),
]


@pytest.mark.parametrize(("flags", "expected"), ALIASES, ids=[" ".join(f) for f, _ in ALIASES])
def test_run_clm_alias(
    flags: list[str], expected: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, err = resolve(capsys, *flags)
    assert {k: cfg[k] for k in expected} == expected
    assert "error" not in err


@pytest.mark.parametrize(
    ("flags", "precision"),
    [
        (["--bf16"], "bf16"),
        (["--bf16", "True"], "bf16"),
        (["--bf16", "true"], "bf16"),
        (["--bf16=true"], "bf16"),
        (["--bf16", "1"], "bf16"),
        (["--bf16", "yes"], "bf16"),
        (["--bf16", "false"], "fp32"),
        (["--bf16=0"], "fp32"),
        (["--bf16", "False", "--fp16", "True"], "fp16"),
        (["--bf16", "--precision", "bf16"], "bf16"),  # agreeing flags are fine
    ],
)
def test_hf_bool_forms(flags: list[str], precision: str, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, _ = resolve(capsys, *flags)
    assert cfg["precision"] == precision


def test_hf_bool_false_switches_off(capsys: pytest.CaptureFixture[str]) -> None:
    cfg, _ = resolve(capsys, "--gradient_checkpointing", "no", "--overwrite_output_dir", "0")
    assert cfg["activation_checkpointing"] is False and cfg["overwrite"] is False


@pytest.mark.parametrize(
    ("world", "flags", "global_batch"),
    [
        (None, ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3"], 6),
        ("1", ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3"], 6),
        ("4", ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3"], 24),
        ("4", ["--per_device_train_batch_size", "2"], 8),  # HF's accumulation defaults to 1
        ("4", ["--micro-batch-size", "2", "--gradient-accumulation-steps", "2"], 16),  # native spellings
        ("4", ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--global-batch-size", "16"], 16),
        ("4", ["--per_device_train_batch_size", "2", "--global-batch-size", "32"], 32),  # explicit global wins
        ("4", ["--micro-batch-size", "2"], 8),  # without accumulation, overdrive's global default stands
    ],
)  # fmt: skip
def test_global_batch_is_per_device_times_world_times_accumulation(
    world: str | None,
    flags: list[str],
    global_batch: int,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if world is not None:
        monkeypatch.setenv("WORLD_SIZE", world)
        monkeypatch.setenv("RANK", "0")
    cfg, _ = resolve(capsys, *flags)
    assert cfg["global_batch_size"] == global_batch
    assert cfg["global_batch_size"] % cfg["micro_batch_size"] == 0


def test_yaml_accumulation_beats_the_per_device_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The accumulation of 1 that --per_device_train_batch_size implies yields to one the YAML sets."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    run = tmp_path / "run.yaml"
    run.write_text("gradient_accumulation_steps: 4\n")
    cfg, _ = resolve(capsys, "--config", str(run), "--per_device_train_batch_size", "3")
    assert (cfg["micro_batch_size"], cfg["gradient_accumulation_steps"], cfg["global_batch_size"]) == (
        3,
        4,
        24,
    )


def test_new_fields_are_yaml_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    values = {
        "eval_batch_size": 4,
        "max_eval_samples": 32,
        "cache_dir": "hf-cache",
        "gradient_accumulation_steps": 2,
        "micro_batch_size": 2,
        "learning_rate": "1e-4",  # YAML 1.1 reads this as a string; it is still a number
    }
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(values))
    cfg, _ = resolve(capsys, "--config", str(run))
    assert {k: cfg[k] for k in values} == {**values, "learning_rate": 1e-4}
    assert cfg["global_batch_size"] == 4


def test_report_to_lists(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """HF takes `--report_to a b`, YAML a list; both become overdrive's comma list."""
    pytest.importorskip("tensorboard")
    cfg, _ = resolve(capsys, "--report_to", "tensorboard")
    assert cfg["report_to"] == "tensorboard"
    run = tmp_path / "run.yaml"
    run.write_text("report_to: [tensorboard]\n")
    cfg, _ = resolve(capsys, "--config", str(run))
    assert cfg["report_to"] == "tensorboard"


def test_flags_beat_yaml_for_new_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run.yaml"
    run.write_text("eval_batch_size: 4\ncache_dir: a\n")
    cfg, _ = resolve(capsys, "--config", str(run), "--per_device_eval_batch_size", "8", "--cache-dir", "b")
    assert (cfg["eval_batch_size"], cfg["cache_dir"]) == (8, "b")


@pytest.mark.parametrize(
    ("ds_config", "preset"),
    [
        (
            {"train_batch_size": 8, "zero_optimization": {"stage": 3}, "bf16": {"enabled": True}},
            "deepspeed-zero3",
        ),
        ({"zero_optimization": {"stage": 2}}, "deepspeed-zero2"),
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, "deepspeed-zero3-offload"),
    ],
)
def test_deepspeed_json_picks_the_preset(
    ds_config: dict[str, Any], preset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds_config))
    cfg, err = resolve(capsys, "--deepspeed", str(path))
    assert cfg["strategy"] == preset
    assert err.startswith("overdrive: note: ") and preset in err


def test_world_size_without_rank_is_not_a_launcher(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shell exporting WORLD_SIZE (the seed's scripts use it for the node count) is not torchrun."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg, _ = resolve(capsys, "--per_device_train_batch_size", "2")
    assert cfg["global_batch_size"] == 2


def test_notes_only_on_rank_zero(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    _, err = resolve(capsys, "--do_train", "--do_eval")
    assert err == ""
    monkeypatch.setenv("RANK", "0")
    _, err = resolve(capsys, "--do_train", "--do_eval")
    assert err.count("\n") == 1 and "--do_train" in err and "--do_eval" in err


def test_native_flags_keep_their_meaning(capsys: pytest.CaptureFixture[str]) -> None:
    cfg, err = resolve(
        capsys, "--micro-batch-size", "2", "--global-batch-size", "8", "--lr-scheduler", "cosine",
        "--precision", "bf16", "--activation-checkpointing", "--max-steps", "3",
    )  # fmt: skip
    assert (cfg["micro_batch_size"], cfg["global_batch_size"], cfg["gradient_accumulation_steps"]) == (
        2,
        8,
        None,
    )
    assert (cfg["min_lr_ratio"], cfg["precision"], cfg["activation_checkpointing"]) == (0.1, "bf16", True)
    assert err == ""


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"learning_rate": math.nan}, "--learning-rate must be a finite number"),
        ({"adam_beta1": 1.0}, "--adam-beta1 must be in [0, 1)"),
        ({"save_total_limit": 0}, "--save-total-limit must be positive"),
        ({"vocab_size": 257}, "--vocab-size must be in [258"),
        ({"seed": 2**32}, "--seed must be in [0, 2**32)"),
        ({"eval_batch_size": -1}, "--eval-batch-size must be positive"),
    ],
)
def test_validate_a_config_built_in_code(change: dict[str, Any], needle: str) -> None:
    with pytest.raises(UsageError, match=None) as err:
        validate(TrainConfig(**change))
    assert needle in str(err.value)


def test_defaults_are_valid() -> None:
    validate(TrainConfig())
    validate(TrainConfig(save_total_limit=None, vocab_size=258, seed=2**32 - 1, adam_beta1=0.0))


def test_flags_switch_strategy_axes_on_and_off(tmp_path: Path) -> None:
    """A flag overrides what the strategy YAML set, in both directions; an absent flag leaves it alone."""
    from overdrive.config import build_config
    from overdrive.train.build import resolve_strategy

    path = tmp_path / "s.yaml"
    path.write_text("compile: true\nkernels: true\nactivation_checkpointing: every_k\nac_every: 2\n")
    off = resolve_strategy(
        build_config({}, {"strategy": str(path), "compile": False, "activation_checkpointing": False})
    )
    assert (off.compile, off.kernels, off.activation_checkpointing, off.ac_every) == (False, True, "none", 1)
    kept = resolve_strategy(build_config({}, {"strategy": str(path), "activation_checkpointing": True}))
    assert (kept.activation_checkpointing, kept.ac_every, kept.compile) == ("every_k", 2, True)
    on = resolve_strategy(build_config({}, {"activation_checkpointing": True, "kernels": True}))
    assert (on.activation_checkpointing, on.kernels, on.compile) == ("full", True, False)
