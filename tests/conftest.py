"""Shared fixtures: small real English text and a model config small enough for many runs on 2 cores."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MICRO_LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "vocab_size": 512,
}


@pytest.fixture(scope="session")
def micro_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "config.json"
    path.write_text(json.dumps(MICRO_LLAMA))
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 60 KB of CPython's documentation topics, one paragraph per line."""
    from overdrive.data.sources import embedded_texts

    lines = []
    for doc in embedded_texts()[:40]:
        lines.extend(p.strip().replace("\n", " ") for p in doc.split("\n\n") if p.strip())
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n".join(lines)[:60_000] + "\n")
    return path


def micro_args(micro_config: Path, text_file: Path, output_dir: Path, *extra: str) -> list[str]:
    """CLI arguments for a fast from-scratch run (vocab 512, block 64).

    The strategy and precision are pinned (single process, fp32: the reference layout) so that a test's
    numbers do not depend on what `--strategy auto` measures on the machine; `extra` may override them
    (argparse keeps the last value). tests/search/test_auto.py covers auto itself.
    """
    return [
        "train",
        "--strategy",
        "single",
        "--precision",
        "fp32",
        "--model-config",
        str(micro_config),
        "--train-file",
        str(text_file),
        "--vocab-size",
        "512",
        "--block-size",
        "64",
        "--output-dir",
        str(output_dir),
        "--quiet",
        "--max-new-tokens",
        "5",
        *extra,
    ]


def cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run `overdrive ARGV` in-process; it must exit 2 with one `overdrive: error:` line and no traceback."""
    from overdrive.cli import main

    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("overdrive: error: ")
    assert "Traceback" not in err
    return err
