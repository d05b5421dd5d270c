"""A whole tiny run: metrics, summary, curves, export that HF loads, a sample, and a falling loss."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from overdrive.cli import main
from overdrive.metrics import read_metrics
from tests.conftest import micro_args

FIELDS = {
    "step",
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_sec",
    "tokens_per_sec_per_device",
    "tflops_per_device",
    "mfu",
    "peak_memory_bytes",
}


def test_tiny_run_writes_everything_and_learns(micro_config, text_file, tmp_path) -> None:
    out = tmp_path / "run"
    argv = micro_args(micro_config, text_file, out, "--max-steps", "40", "--logging-steps", "5")
    argv += ["--eval-steps", "20", "--learning-rate", "1e-2", "--save-steps", "20", "--packing", "documents"]
    assert main(argv) == 0

    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert all(set(r) >= FIELDS for r in train)
    assert [r["step"] for r in train] == [1, 5, 10, 15, 20, 25, 30, 35, 40]
    # vocab 512: the loss starts at ln(512) = 6.24 and this 0.1M-parameter model plateaus near 5.2 within 40
    # steps; the 0.8x acceptance on the tiny preset is checked by test_default_preset_acceptance.
    assert train[-1]["loss"] < 0.9 * train[0]["loss"]
    assert train[-1]["tokens_per_sec"] > 0 and train[-1]["tflops_per_device"] > 0
    assert train[-1]["mfu"] is None  # CPU peak is unknown
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 40
    assert summary["final_eval_perplexity"] < summary["first_eval_perplexity"]
    assert summary["config"]["packing"] == "documents"
    assert summary["versions"]["torch"] == torch.__version__
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "sample.txt").read_text().startswith("The")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000020", "step-0000040"]
    assert not any(p.name.endswith(".tmp") for p in out.rglob("*"))

    model = AutoModelForCausalLM.from_pretrained(out / "final", use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(out / "final")
    ids = tok("The object", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss)
    assert model.config.vocab_size == len(tok)


def test_overwrite_replaces_only_run_artifacts(micro_config, text_file, tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "metrics.jsonl").write_text('{"step": 999, "loss": 1.0}\n')
    argv = micro_args(micro_config, text_file, out, "--max-steps", "2", "--overwrite", "--no-export")
    assert main(argv) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert max(r["step"] for r in read_metrics(out / "metrics.jsonl")) == 2
    assert not (out / "final").exists()


@pytest.mark.slow
def test_default_preset_acceptance(tmp_path) -> None:
    """The issue's acceptance run: tiny preset on the embedded text, 60 steps, last loss < 0.8 x first."""
    out = tmp_path / "run"
    assert (
        main(["train", "--max-steps", "60", "--output-dir", str(out), "--quiet", "--max-new-tokens", "5"])
        == 0
    )
    train = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert train[-1]["loss"] < 0.8 * train[0]["loss"]
    assert (
        AutoModelForCausalLM.from_pretrained(out / "final", use_safetensors=True).config.model_type == "llama"
    )
