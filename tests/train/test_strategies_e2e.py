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
    assert main(micro_args(micro_config, text_file, out, *COMMON)) == 0
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "deepspeed-zero3"])
def test_two_ranks_match_one_process(strategy, single_run, micro_config, text_file, tmp_path) -> None:
    out = tmp_path / strategy
    proc = torchrun(
        micro_args(micro_config, text_file, out, *COMMON, "--strategy", strategy, "--save-steps", "5")
    )
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
        assert (wa[name] - wb[name]).abs().max() <= 1e-4, name


def test_export_command_writes_loadable_model_from_fsdp_checkpoint(micro_config, text_file, tmp_path) -> None:
    run = tmp_path / "run"
    argv = micro_args(micro_config, text_file, run, *COMMON, "--strategy", "fsdp", "--save-steps", "5")
    proc = torchrun(argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "exported"
    assert main(["export", str(run / "checkpoints" / "step-0000010"), str(out)]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    AutoTokenizer.from_pretrained(out)
    final = load_file(str(run / "final" / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        assert (tensor - final[name]).abs().max() == 0, name
