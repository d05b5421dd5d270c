"""Bad input: one line naming the problem and the fix, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from overdrive.cli import main
from tests.conftest import cli_error, micro_args


def test_missing_train_file_via_real_cli(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "overdrive",
            "train",
            "--train-file",
            "does-not-exist.txt",
            "--output-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "overdrive: error: --train-file does-not-exist.txt does not exist; pass an existing file"
    ]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--max-steps", "0"], "--max-steps must be positive"),
        (["--micro-batch-size", "-2"], "--micro-batch-size must be positive"),
        (["--block-size", "0"], "--block-size must be positive"),
        (["--learning-rate", "-1"], "--learning-rate must be positive"),
        (["--global-batch-size", "6", "--micro-batch-size", "4"], "multiple of --micro-batch-size"),
        (["--text-column", "body"], "text column 'body'"),
        (["--block-size", "100000"], "lower --block-size"),
        (["--precision", "fp8"], "invalid choice"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_bad_flags(extra, needle, micro_config, text_file, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    err = cli_error(micro_args(micro_config, text_file, out, *extra), capsys)
    assert needle in err
    assert not out.exists()


def test_empty_train_file(micro_config, tmp_path, capsys) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    err = cli_error(micro_args(micro_config, empty, tmp_path / "run"), capsys)
    assert "is empty" in err
    assert not (tmp_path / "run").exists()


def test_unknown_preset(text_file, tmp_path, capsys) -> None:
    argv = [
        "train",
        "--model-config",
        "gpt-99",
        "--train-file",
        str(text_file),
        "--output-dir",
        str(tmp_path / "r"),
    ]
    assert "unknown model config 'gpt-99'" in cli_error(argv, capsys)
    assert not (tmp_path / "r").exists()


def test_malformed_yaml_and_unknown_key(micro_config, text_file, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: [1,\n")
    assert "not valid YAML" in cli_error(["train", "--config", str(bad)], capsys)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("max_steps: 3\nlearning_rat: 0.1\n")
    assert "unknown key 'learning_rat'" in cli_error(["train", "--config", str(unknown)], capsys)
    wrong_type = tmp_path / "type.yaml"
    wrong_type.write_text("max_steps: three\n")
    assert "--max-steps must be a number" in cli_error(["train", "--config", str(wrong_type)], capsys)


def test_existing_output_dir_needs_overwrite(micro_config, text_file, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    err = cli_error(micro_args(micro_config, text_file, out), capsys)
    assert "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_resume_from_missing_or_corrupt_checkpoint(micro_config, text_file, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    err = cli_error(micro_args(micro_config, text_file, out, "--resume", str(tmp_path / "nope")), capsys)
    assert "does not exist" in err
    err = cli_error(["train", "--resume", "latest"], capsys)
    assert "--resume latest needs --output-dir" in err
    corrupt = out / "checkpoints" / "step-0000003"
    corrupt.mkdir(parents=True)
    (corrupt / "overdrive-checkpoint.json").write_text("{not json")
    err = cli_error(micro_args(micro_config, text_file, out, "--resume", str(corrupt)), capsys)
    assert "corrupt" in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]


def test_model_dir_with_only_pickle_weights(micro_config, text_file, tmp_path, capsys) -> None:
    model_dir = tmp_path / "pickled"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(micro_config.read_text())
    torch.save({"w": torch.zeros(1)}, model_dir / "pytorch_model.bin")
    argv = [
        "train",
        "--model",
        str(model_dir),
        "--train-file",
        str(text_file),
        "--output-dir",
        str(tmp_path / "r"),
    ]
    err = cli_error(argv, capsys)
    assert "only pickle weights" in err and "safetensors" in err
    assert not (tmp_path / "r").exists()


def test_print_config_resolves_yaml_and_flags(tmp_path, capsys) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("max_steps: 7\nlearning_rate: 0.002\nblock-size: 128\n")
    assert main(["train", "--config", str(cfg), "--max-steps", "9", "--print-config"]) == 0
    import yaml

    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["max_steps"] == 9  # flag wins
    assert resolved["learning_rate"] == 0.002 and resolved["block_size"] == 128
    assert json.dumps(resolved)  # plain data
