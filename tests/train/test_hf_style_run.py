"""A run_clm.py-style command runs as overdrive, and --report-to tensorboard mirrors metrics.jsonl."""

from __future__ import annotations

import json

import pytest

from overdrive.cli import main
from overdrive.metrics import read_metrics
from tests.conftest import micro_args


def test_seed_run_clm_flags_train_with_hf_global_batch(
    micro_config, text_file, tmp_path, monkeypatch
) -> None:
    """The seed 000 flags (tiny config): the global batch is per-device × ranks × accumulation, as in HF."""
    monkeypatch.setenv("RANK", "0")  # a launcher's environment: one rank of one
    monkeypatch.setenv("WORLD_SIZE", "1")
    out = tmp_path / "clm"
    argv = ["train", "--config_name", str(micro_config), "--train_file", str(text_file)]
    argv += ["--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1"]
    argv += ["--gradient_accumulation_steps", "4", "--block_size", "64", "--bf16", "--do_train"]
    argv += ["--use_fast_tokenizer", "false", "--optim", "adamw_torch", "--gradient_checkpointing", "no"]
    argv += ["--max_steps", "3", "--logging_steps", "1", "--output_dir", str(out), "--overwrite_output_dir"]
    argv += ["--vocab-size", "512", "--quiet", "--max-new-tokens", "0", "--max_eval_samples", "3"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["global_batch_size"], summary["micro_batch_size"]) == (4, 1)
    assert summary["gradient_accumulation_steps"] == 4 and summary["world_size"] == 1
    assert summary["config"]["precision"] == "bf16"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3]


def test_report_to_tensorboard_mirrors_metrics(micro_config, text_file, tmp_path) -> None:
    pytest.importorskip("tensorboard", reason="pip install 'overdrive[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = micro_args(micro_config, text_file, out, "--max-steps", "4", "--logging-steps", "1")
    assert main([*argv, "--eval-steps", "2", "--report-to", "tensorboard"]) == 0
    records = read_metrics(out / "metrics.jsonl")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    expected = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert logged.keys() == expected.keys() == {1, 2, 3, 4}
    for step, loss in expected.items():
        assert logged[step] == pytest.approx(loss, rel=1e-6)  # event files store float32
    evals = {e.step for e in events.Scalars("eval/loss")}
    assert evals == {r["step"] for r in records if "eval_loss" in r} == {0, 2, 4}
