"""Pipeline parallelism on real process groups (gloo) against the single-process run.

A tied-embedding tiny Llama (4 layers) trains 10 steps, global batch 8, micro batch 2 (4 micro-batches per
step through the pipeline). fp32, deterministic, same initial weights: every step's loss and pre-clip grad
norm must equal the single-process run's within 1e-5, and after step 1 every parameter's gradient within 1e-5
of its largest entry (the tolerance of the other engines' tests; reductions happen in another order, so not
bit-identical). Every schedule torch provides that runs here is covered, with 2 virtual stages per rank for
the interleaved and zero-bubble ones; pp 2 × fsdp 2 and pp 2 × tp 2 run on 4 ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"
DRIVER = HERE / "_pipeline_driver.py"
TOL = 1e-5
SCHEDULES = ["pp-gpipe", "pp-1f1b", "pp-interleaved-1f1b", "pp-interleaved-zero-bubble", "pp-zbv-zero-bubble"]
TWO_RANKS = [*SCHEDULES, "pp-split", "pp-memory", "pp-1f1b-docs"]  # pp-memory: selective recompute + offload
FOUR_RANKS = ["pp-fsdp", "pp-tp"]  # pp 2 × fsdp 2; pp 2 × tp 2 (sequence parallel)


def run_driver(tmp: Path, label: str, nproc: int, args: list[str], timeout: float = 400) -> dict:
    out = tmp / f"{label}.json"
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), str(HERE), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("OVERDRIVE_DIST_TIMEOUT", "120")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + [str(DRIVER), "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return json.loads(out.read_text())


def record_of(results: dict, name: str) -> dict:
    record = results[name]
    assert "error" not in record, f"{name}: {record['error']}\n{record.get('traceback', '')}"
    return record


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pipeline")
    (path / "grads").mkdir()
    (path / "export").mkdir()
    return path


@pytest.fixture(scope="module")
def reference(work: Path) -> dict:
    args = ["--variants", "single", "single-docs", "--grads", "grads", "--export", "export"]
    return run_driver(work, "reference", 1, [*args, "--save-at", "5", "--ckpt-root", "ckpt1"])


@pytest.fixture(scope="module")
def two_ranks(work: Path) -> dict:
    args = [
        "--variants",
        *TWO_RANKS,
        "--grads",
        "grads",
        "--export",
        "export",
        "--save-at",
        "5",
        "--ckpt-root",
        "ckpt",
    ]
    return run_driver(work, "two", 2, args)


@pytest.fixture(scope="module")
def four_ranks(work: Path) -> dict:
    return run_driver(work, "four", 4, ["--variants", *FOUR_RANKS, "--grads", "grads"], timeout=500)


def reference_of(name: str) -> str:
    return "single-docs" if name.endswith("-docs") else "single"


def assert_same_training(work: Path, record: dict, reference: dict, name: str) -> None:
    ref = record_of(reference, reference_of(name))
    loss_diff = max_diff(record["losses"], ref["losses"])
    print(f"{name}: max |loss - single| = {loss_diff:.2e}")
    assert loss_diff <= TOL
    assert max_diff(record["grad_norms"], ref["grad_norms"]) <= TOL
    grads = load_file(str(work / "grads" / f"{name}.safetensors"))
    expected = load_file(str(work / "grads" / f"{reference_of(name)}.safetensors"))
    assert set(grads) == set(expected), set(grads) ^ set(expected)
    for key, value in expected.items():
        scale = max(value.abs().max().item(), 1e-12)
        assert (grads[key] - value).abs().max().item() <= TOL * scale, key


@pytest.mark.parametrize("name", TWO_RANKS)
def test_two_stage_pipeline_trains_like_one_process(
    name: str, work: Path, reference: dict, two_ranks: dict
) -> None:
    record = record_of(two_ranks, name)
    assert record["engine"] == "PipelineEngine"
    assert_same_training(work, record, reference, name)


@pytest.mark.parametrize("name", FOUR_RANKS)
def test_pipeline_composes_on_four_ranks(name: str, work: Path, reference: dict, four_ranks: dict) -> None:
    record = record_of(four_ranks, name)
    assert four_ranks["world_size"] == 4 and record["engine"] == "PipelineEngine"
    assert_same_training(work, record, reference, name)


def test_full_weights_gathered_from_the_stages(work: Path, reference: dict, two_ranks: dict) -> None:
    """After 10 steps the stages' weights, gathered on rank 0, are the single process's weights."""
    record_of(two_ranks, "pp-1f1b")
    got = load_file(str(work / "export" / "pp-1f1b.safetensors"))
    expected = load_file(str(work / "export" / "single.safetensors"))
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.allclose(got[key], value, atol=TOL, rtol=0), key


def test_pipeline_checkpoint_resumes_in_one_process(work: Path, reference: dict, two_ranks: dict) -> None:
    """pp 2 -> pp 1: the stages' DCP checkpoint at step 5 continues as the uninterrupted single run."""
    record_of(two_ranks, "pp-1f1b")
    resumed = run_driver(
        work, "resumed", 1, ["--variants", "single", "--resume", str(work / "ckpt" / "pp-1f1b")]
    )
    record = record_of(resumed, "single")
    assert record["start_step"] == 5
    ref = record_of(reference, "single")
    assert max_diff(record["losses"], ref["losses"][5:]) <= TOL


def test_one_process_checkpoint_resumes_in_a_pipeline(work: Path, reference: dict) -> None:
    """pp 1 -> pp 2: a single-process checkpoint (safetensors + optimizer.pt, parameters named) loads into the
    stages by name and continues the uninterrupted curve."""
    resumed = run_driver(
        work, "pp-from-one", 2, ["--variants", "pp-1f1b", "--resume", str(work / "ckpt1" / "single")]
    )
    record = record_of(resumed, "pp-1f1b")
    assert record["start_step"] == 5
    assert max_diff(record["losses"], record_of(reference, "single")["losses"][5:]) <= TOL
