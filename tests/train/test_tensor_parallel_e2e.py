"""`overdrive train` with tensor parallelism (tp, fsdp-tp, hsdp × tp) gives the single-process losses, and its
DCP checkpoints move between layouts: tp 2 -> fsdp 2 ranks -> 1 process -> tp 2 continues the same curve."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from overdrive.cli import main
from overdrive.metrics import read_metrics
from tests.conftest import micro_args

pytestmark = pytest.mark.distributed
TOL = 1e-5  # fp32: layouts change only the order of sums (observed ≤ 1e-7)
COMMON = ["--precision", "fp32", "--deterministic", "--global-batch-size", "8", "--micro-batch-size", "4"]
COMMON += ["--logging-steps", "1", "--max-new-tokens", "3"]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def torchrun(nproc: int, argv: list[str], timeout: int = 400) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    proc = subprocess.run(
        [*cmd, "-m", "overdrive", *argv], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def assert_same_curve(expected: dict[int, float], got: dict[int, float]) -> None:
    assert got and set(got) <= set(expected), (sorted(got), sorted(expected))
    for step, loss in got.items():
        assert abs(loss - expected[step]) <= TOL * abs(expected[step]), (step, expected[step], loss)


@pytest.fixture(scope="module")
def reference(micro_config, text_file, tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(micro_args(micro_config, text_file, out, *COMMON, "--max-steps", "10")) == 0
    return losses(out)


# fsdp × tp on 4 ranks is checked at the engine level (tests/parallel/test_tensor_parallel.py, two models);
# hsdp × tp here runs the same 4-rank CLI path with one more mesh dimension
@pytest.mark.parametrize(
    ("strategy", "nproc"),
    [("tp", 2), ("hsdp-tp", 4)],
)
def test_tensor_parallel_layouts_match_one_process(
    strategy, nproc, reference, micro_config, text_file, tmp_path
) -> None:
    if strategy == "hsdp-tp":  # 2 replicas × 1 shard × tp 2
        yaml = tmp_path / "hsdp-tp.yaml"
        yaml.write_text("data_parallel: hsdp\nshard_size: 1\ntensor_parallel: 2\n")
        strategy = str(yaml)
    out = tmp_path / "run"
    torchrun(
        nproc, micro_args(micro_config, text_file, out, *COMMON, "--max-steps", "10", "--strategy", strategy)
    )
    got = losses(out)
    assert sorted(got) == list(range(1, 11))
    assert_same_curve(reference, got)
    assert (out / "final" / "model.safetensors").is_file()  # the export gathered the shards


def test_reshard_round_trip_continues_the_curve(micro_config, text_file, tmp_path) -> None:
    """tp 2 (steps 1-2) -> fsdp on 2 ranks (3-4) -> fsdp on 1 process (5-6) -> tp 2 (7-8), one run dir.

    Each leg ends the run at its own --max-steps, so the schedule must not depend on it: constant lr.
    """
    common = [*COMMON, "--lr-scheduler", "constant"]
    uninterrupted = tmp_path / "uninterrupted"
    assert main(micro_args(micro_config, text_file, uninterrupted, *common, "--max-steps", "8")) == 0
    reference = losses(uninterrupted)
    out = tmp_path / "run"

    def leg(nproc: int, strategy: str, until: int, resume: bool) -> None:
        argv = micro_args(micro_config, text_file, out, *common, "--strategy", strategy, "--save-steps", "2")
        argv += ["--max-steps", str(until), "--no-export"] + (["--resume", "latest"] if resume else [])
        if nproc == 1:
            assert main(argv) == 0
        else:
            torchrun(nproc, argv)

    leg(2, "tp", 2, resume=False)
    leg(2, "fsdp", 4, resume=True)
    leg(1, "fsdp", 6, resume=True)
    leg(2, "tp", 8, resume=True)
    got = losses(out)
    assert sorted(got) == list(range(1, 9))
    assert_same_curve(reference, got)
    # the tensor-parallel checkpoint exports to an HF model with the uninterrupted run's weights
    exported = tmp_path / "exported"
    assert main(["export", str(out / "checkpoints" / "step-0000008"), str(exported)]) == 0
    from transformers import AutoModelForCausalLM

    mine = AutoModelForCausalLM.from_pretrained(exported, use_safetensors=True).state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(uninterrupted / "final", use_safetensors=True).state_dict()
    for name, tensor in theirs.items():
        torch.testing.assert_close(
            mine[name], tensor, rtol=1e-4, atol=1e-5
        )  # 8 Adam steps of fp32 order noise
