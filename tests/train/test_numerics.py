"""Accumulation and resume give the same numbers as one uninterrupted, unaccumulated run (fp32)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from overdrive.cli import main
from overdrive.metrics import read_metrics
from tests.conftest import micro_args

TOL = 1e-5  # fp32: only summation order differs between the runs


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def test_four_micro_batches_of_two_equal_one_of_eight(micro_config, text_file, tmp_path) -> None:
    common = ["--max-steps", "4", "--global-batch-size", "8", "--logging-steps", "1", "--deterministic"]
    assert main(micro_args(micro_config, text_file, tmp_path / "a", *common, "--micro-batch-size", "8")) == 0
    assert main(micro_args(micro_config, text_file, tmp_path / "b", *common, "--micro-batch-size", "2")) == 0
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert list(a) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) <= TOL * abs(a[step]), (step, a[step], b[step])
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=TOL, atol=TOL)


def test_packed_documents_accumulate_exactly(micro_config, text_file, tmp_path) -> None:
    """Rows with ignored labels make per-micro-batch means wrong; the global token count must be used."""
    common = [
        "--max-steps",
        "3",
        "--global-batch-size",
        "8",
        "--logging-steps",
        "1",
        "--packing",
        "documents",
    ]
    assert main(micro_args(micro_config, text_file, tmp_path / "a", *common, "--micro-batch-size", "8")) == 0
    assert main(micro_args(micro_config, text_file, tmp_path / "b", *common, "--micro-batch-size", "1")) == 0
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    for step in a:
        assert abs(a[step] - b[step]) <= TOL * abs(a[step]), (step, a[step], b[step])


def test_resume_matches_uninterrupted_run(micro_config, text_file, tmp_path) -> None:
    common = [
        "--max-steps",
        "6",
        "--global-batch-size",
        "4",
        "--micro-batch-size",
        "2",
        "--logging-steps",
        "1",
        "--save-steps",
        "3",
        "--save-total-limit",
        "5",
        "--deterministic",
        "--warmup-steps",
        "2",
    ]
    full = tmp_path / "full"
    assert main(micro_args(micro_config, text_file, full, *common)) == 0
    # The interrupted run: everything after the step-3 checkpoint is lost.
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for name in ("final", "summary.json", "curves.png", "sample.txt"):
        path = cut / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(cut / "checkpoints" / "step-0000006")
    assert main(micro_args(micro_config, text_file, cut, *common, "--resume", "latest")) == 0
    a, b = losses(full), losses(cut)
    assert list(b) == [1, 2, 3, 4, 5, 6]  # metrics read as one run
    for step in (4, 5, 6):
        assert abs(a[step] - b[step]) <= TOL * abs(a[step]), (step, a[step], b[step])
    wa, wb = final_weights(full), final_weights(cut)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=TOL, atol=TOL)


def test_activation_checkpointing_does_not_change_numerics(micro_config, text_file, tmp_path) -> None:
    common = ["--max-steps", "3", "--logging-steps", "1", "--micro-batch-size", "4", "--deterministic"]
    assert main(micro_args(micro_config, text_file, tmp_path / "a", *common)) == 0
    argv = micro_args(micro_config, text_file, tmp_path / "b", *common, "--activation-checkpointing")
    assert main(argv) == 0
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    for step in a:
        assert abs(a[step] - b[step]) <= TOL * abs(a[step]), (step, a[step], b[step])


def test_bf16_autocast_tracks_fp32(micro_config, text_file, tmp_path) -> None:
    """bf16 keeps 8 mantissa bits (~3 significant digits): losses agree to ~1e-2 relative over a few steps."""
    common = ["--max-steps", "3", "--logging-steps", "1"]
    assert main(micro_args(micro_config, text_file, tmp_path / "a", *common)) == 0
    assert main(micro_args(micro_config, text_file, tmp_path / "b", *common, "--precision", "bf16")) == 0
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-2 * abs(a[step]), (step, a[step], b[step])
        assert a[step] != b[step]  # bf16 really ran
