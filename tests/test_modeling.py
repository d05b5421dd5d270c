"""Model sources: non-causal configs and unreachable hub ids fail in one line, before any data is read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from overdrive import hub
from overdrive.cli import main
from overdrive.errors import UsageError
from overdrive.modeling import preset_config
from tests.conftest import MICRO_LLAMA

T5 = {"model_type": "t5", "d_model": 64, "num_layers": 2, "num_heads": 2, "d_kv": 32, "d_ff": 128}
BERT = {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def one_error_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("overdrive: error: ") and "Traceback" not in err
    return err


@pytest.fixture
def binary_data(tmp_path: Path) -> Path:
    """A train file that fails to load: a model error reported instead proves the model was checked first."""
    path = tmp_path / "binary.txt"
    path.write_bytes(b"\xff\xfe\x00garbage\n" * 10)
    return path


def train_argv(binary_data: Path, out: Path, *model: str) -> list[str]:
    return ["train", *model, "--train-file", str(binary_data), "--output-dir", str(out)]


def write_config(folder: Path, config: dict, weights: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if weights:
        (folder / "model.safetensors").write_bytes(b"not read: the config is refused first")
    return folder


@pytest.mark.parametrize(
    ("config", "phrases"),
    [
        (
            T5,
            [
                "'t5' config, an encoder-decoder model, not a causal language model",
                "llama",
                "causal-LM mapping",
            ],
        ),
        (BERT, ["'bert' config, an encoder", '"is_decoder": true', "llama"]),
        ({"hidden_size": 64}, ["has no model_type", '"model_type": "llama"']),
    ],
)
def test_model_config_that_is_not_a_causal_lm(config, phrases, binary_data, tmp_path, capsys) -> None:
    cfg = write_config(tmp_path / "cfg", config) / "config.json"
    out = tmp_path / "run"
    err = one_error_line(train_argv(binary_data, out, "--model-config", str(cfg)), capsys)
    for phrase in phrases:
        assert phrase in err, err
    assert not out.exists()


def test_model_dir_with_a_non_causal_config(binary_data, tmp_path, capsys) -> None:
    model_dir = write_config(tmp_path / "t5-small", T5, weights=True)
    out = tmp_path / "run"
    err = one_error_line(train_argv(binary_data, out, "--model", str(model_dir)), capsys)
    assert f"{model_dir / 'config.json'} is a 't5' config" in err and "decoder-only" in err
    assert not out.exists()


def test_model_dir_with_a_broken_config(binary_data, tmp_path, capsys) -> None:
    model_dir = tmp_path / "broken"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{not json")
    (model_dir / "model.safetensors").write_bytes(b"x")
    err = one_error_line(train_argv(binary_data, tmp_path / "run", "--model", str(model_dir)), capsys)
    assert "is not a readable JSON file" in err and "fix the file" in err


def test_model_file_instead_of_a_directory(micro_config, binary_data, tmp_path, capsys) -> None:
    err = one_error_line(train_argv(binary_data, tmp_path / "run", "--model", str(micro_config)), capsys)
    assert "is a file; pass the directory holding config.json" in err


def test_causal_configs_pass(tmp_path) -> None:
    assert preset_config(str(write_config(tmp_path / "llama", MICRO_LLAMA))).model_type == "llama"
    decoder_bert = preset_config(str(write_config(tmp_path / "bert", {**BERT, "is_decoder": True})))
    assert decoder_bert.is_decoder
    assert preset_config("tiny").model_type == "llama"


# ---- hub ids without a hub ----

HUB_FLAGS = [
    ("--model", ["--model", "some-org/some-model"]),
    ("--tokenizer", ["--model-config", "tiny", "--tokenizer", "some-org/some-tokenizer"]),
    ("--dataset", ["--model-config", "tiny", "--dataset", "some-org/some-dataset"]),
]


def hub_argv(args: list[str], text_file: Path, out: Path) -> list[str]:
    data = [] if "--dataset" in args else ["--train-file", str(text_file)]
    return ["train", *args, *data, "--output-dir", str(out)]


@pytest.mark.parametrize(("flag", "args"), HUB_FLAGS)
def test_hub_id_while_offline(flag, args, text_file, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "probe_hub", lambda: pytest.fail("no probe in offline mode"))
    out = tmp_path / "run"
    err = one_error_line(hub_argv(args, text_file, out), capsys)
    assert f"{flag} some-org/" in err and "the hub is offline (HF_HUB_OFFLINE=1)" in err
    assert "unset HF_HUB_OFFLINE" in err
    assert not out.exists()


@pytest.mark.parametrize(("flag", "args"), HUB_FLAGS)
def test_hub_id_while_unreachable(flag, args, text_file, tmp_path, monkeypatch, capsys) -> None:
    for var in hub.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "probe_hub", lambda: "https://huggingface.co cannot be reached: refused")
    out = tmp_path / "run"
    err = one_error_line(hub_argv(args, text_file, out), capsys)
    assert f"{flag} some-org/" in err and "the hub is unreachable" in err and "cannot be reached" in err
    assert "HF_HUB_OFFLINE=1" in err  # the fix for a machine with a filled cache
    assert not out.exists()


def test_offline_mode_lets_cached_models_through(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "cached_on_disk", lambda repo, files, repo_type="model": repo == "org/cached")
    hub.require_hub("org/cached", "--model", cached_files=("config.json",))
    with pytest.raises(UsageError, match="hub is offline"):
        hub.require_hub("org/other", "--model", cached_files=("config.json",))


def test_reachable_hub_still_goes_to_from_pretrained(monkeypatch) -> None:
    """The checks only stand in front of the real loading path: with a hub that answers, the id reaches it."""
    from transformers import AutoTokenizer

    from overdrive.data.tokenizer import load_tokenizer

    for var in hub.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "probe_hub", lambda: None)
    calls = []

    def fake_from_pretrained(name, **kwargs):
        calls.append(name)
        raise OSError("some-org/some-tokenizer is not a valid model identifier")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake_from_pretrained)
    with pytest.raises(UsageError, match="could not load tokenizer 'some-org/some-tokenizer'"):
        load_tokenizer("some-org/some-tokenizer")
    assert calls == ["some-org/some-tokenizer"]


def test_probe_is_one_short_request_per_process(monkeypatch) -> None:
    import huggingface_hub

    seen = []

    class Session:
        def head(self, url, timeout):
            seen.append((url, timeout))
            raise ConnectionError("[Errno 111] Connection refused")

    monkeypatch.setattr(huggingface_hub, "get_session", lambda: Session())
    hub.probe_hub.cache_clear()
    try:
        first, second = hub.probe_hub(), hub.probe_hub()
    finally:
        hub.probe_hub.cache_clear()
    assert first == second and "cannot be reached: [Errno 111] Connection refused" in first
    assert len(seen) == 1 and seen[0][1] <= 3


def test_local_looking_paths_are_not_sent_to_the_hub(tmp_path, capsys, text_file) -> None:
    missing = tmp_path / "no" / "such" / "model"
    err = one_error_line(hub_argv(["--model", str(missing)], text_file, tmp_path / "run"), capsys)
    assert f"--model {missing} does not exist" in err


def test_unreachable_hub_fails_fast_in_a_real_process(text_file, tmp_path) -> None:
    """No HF_HUB_OFFLINE and an endpoint that refuses connections: before the probe this took 30-55 s and
    printed a retry warning per attempt; now one line (well under the retry time, with slack for slow CI)."""
    env = {k: v for k, v in os.environ.items() if k not in hub.OFFLINE_VARS}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens on the discard port: refused at once
    out = tmp_path / "run"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "overdrive", *hub_argv(["--model", "some-org/some-model"], text_file, out)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    elapsed = time.monotonic() - start
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "the hub is unreachable" in lines[0], proc.stderr
    assert "Retrying" not in proc.stdout + proc.stderr
    assert elapsed < 30, elapsed  # the retry path takes 32-55 s
    assert not out.exists()
