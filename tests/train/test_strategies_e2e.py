"""`torchrun -m overdrive train --strategy S` on 2 ranks gives the single-process losses (fp32, 1e-5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from overdrive.cli import main
from overdrive.metrics import read_metrics
from tests.conftest import micro_args

pytestmark = pytest.mark.distributed
TOL = 1e-5  # fp32: ranks only change the order of the gradient sums
COMMON = [
    "--precision",
    "fp32",
    "--deterministic",
    "--max-steps",
    "10",
    "--global-batch-size",
    "8",
    "--micro-batch-size",
    "4",
    "--logging-steps",
    "1",
]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def torchrun(argv: list[str], timeout: int = 400) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.run(
        [*cmd, "-m", "overdrive", *argv], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.fixture(scope="module")
def single_run(micro_config, text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(micro_args(micro_config, text_file, out, *COMMON, "--strategy", "single")) == 0  # not auto
    return out


@pytest.fixture(scope="module")
def fsdp_run(micro_config, text_file, tmp_path_factory) -> Path:
    """One FSDP run on 2 ranks, checkpoints at steps 5 and 10, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    argv = micro_args(micro_config, text_file, out, *COMMON, "--strategy", "fsdp", "--save-steps", "5")
    proc = torchrun([*argv, "--save-total-limit", "3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# zero2 is FSDP without resharding after forward: the engine matrix (tests/parallel) covers it
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed-zero3"])
def test_two_ranks_match_one_process(strategy, single_run, micro_config, text_file, tmp_path, request) -> None:
    if strategy == "fsdp":
        out = request.getfixturevalue("fsdp_run")
    else:
        out = tmp_path / strategy
        argv = micro_args(micro_config, text_file, out, *COMMON, "--strategy", strategy, "--save-steps", "5")
        proc = torchrun(argv)
        assert proc.returncode == 0, proc.stderr[-3000:]
    expected, got = losses(single_run), losses(out)
    assert len(got) == len(expected) == 10
    for step, (a, b) in enumerate(zip(expected, got, strict=True), start=1):
        assert abs(a - b) <= TOL * abs(a), (strategy, step, a, b)
    # the exported model is the single-process one
    wa = load_file(str(single_run / "final" / "model.safetensors"))
    wb = load_file(str(out / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert (wa[name] - wb[name]).abs().max() <= TOL, name


def test_fsdp_shards_a_model_without_decoder_layers_as_one_unit(micro_config, text_file, tmp_path) -> None:
    """num_hidden_layers: 0 used to raise a raw ValueError on every rank inside FSDP; now it trains."""
    import json
    import warnings

    config = tmp_path / "no-layers.json"
    config.write_text(json.dumps({**json.loads(micro_config.read_text()), "num_hidden_layers": 0}))
    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(micro_args(config, text_file, run, "--strategy", "fsdp", "--max-steps", "2")) == 0
    assert any("no decoder layers to shard one by one" in str(w.message) for w in caught)
    assert len(losses(run)) == 2 and (run / "final" / "model.safetensors").is_file()


def test_export_command_writes_loadable_model_from_fsdp_checkpoint(fsdp_run, tmp_path) -> None:
    run = fsdp_run
    out = tmp_path / "exported"
    assert main(["export", str(run / "checkpoints" / "step-0000010"), str(out)]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    AutoTokenizer.from_pretrained(out)
    final = load_file(str(run / "final" / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        assert (tensor - final[name]).abs().max() == 0, name


def test_reshard_fsdp_two_ranks_to_one_process(
    single_run, fsdp_run, micro_config, text_file, tmp_path
) -> None:
    """An FSDP checkpoint from 2 ranks resumes on 1 process; the next losses are the uninterrupted ones."""
    run = fsdp_run
    cut = tmp_path / "cut"
    cut.mkdir()
    import shutil

    shutil.copytree(run / "checkpoints" / "step-0000005", cut / "checkpoints" / "step-0000005")
    shutil.copytree(run / "tokenizer", cut / "tokenizer")
    (cut / "metrics.jsonl").write_text(
        "".join(line for line in (run / "metrics.jsonl").read_text().splitlines(True) if '"step": 1,' in line)
    )
    argv = micro_args(micro_config, text_file, cut, *COMMON, "--strategy", "fsdp", "--resume", "latest")
    assert main(argv) == 0
    expected = losses(single_run)
    got = {r["step"]: r["loss"] for r in read_metrics(cut / "metrics.jsonl") if "loss" in r}
    for step in range(6, 11):
        a, b = expected[step - 1], got[step]
        assert abs(a - b) <= TOL * abs(a), (step, a, b)


def test_killed_rank_restarts_and_resumes(single_run, micro_config, text_file, tmp_path) -> None:
    """torchrun --max-restarts 1 + --resume latest: rank 1 dies after step 7, the group resumes from step 5."""
    run = tmp_path / "run"
    argv = micro_args(micro_config, text_file, run, *COMMON, "--strategy", "ddp", "--save-steps", "5")
    argv += ["--resume", "latest"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OVERDRIVE_FAULT_STEP": "7"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["--max-restarts", "1", "-m", "overdrive", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the fault happened: rank 0 noticed the lost peer, or torchrun saw rank 1's SIGKILL (exit -9) first and
    # stopped rank 0 before gloo told it (a race; torchrun's log line never spells "SIGKILL")
    assert "lost contact with another rank" in proc.stderr or "failed (exitcode: -9)" in proc.stderr
    got = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
    assert sorted(got) == list(range(1, 11))  # steps 6 and 7 were logged twice, the file keeps one run
    for step, a in enumerate(losses(single_run), start=1):
        assert abs(a - got[step]) <= TOL * abs(a), (step, a, got[step])
