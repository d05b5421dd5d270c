"""Every strategy on real engines, 2 gloo processes under torchrun, against the single-process engine.

A tiny Llama (hidden 64, 2 layers, vocab 256) trains 10 steps on synthetic tokens with global batch 8 and micro
batch 2 (accumulation 2 per rank on 2 ranks, 4 on one process). Losses and pre-clip grad norms must match the
single-process run within 1e-5 in fp32. bf16 parameters (FSDP2 MixedPrecisionPolicy) are compared with the fp32
run at bf16 precision: |Δloss| <= loss * 2**-9 (one bf16 unit roundoff of the loss value, ~0.011 at 5.5), and
must differ from it by more than 1e-7 (proof that bf16 was really used). The same bound covers gradients
reduced in bf16 (DDP's bf16 compression hook, FSDP2 reduce_dtype bf16).

To save start-up time on 2 CPU cores the strategies run one after another inside one torchrun job; each
records its losses, facts about the engine (wrapper type, DTensor sharding, ZeRO stage) and errors as JSON.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"
DRIVER = HERE / "_parallel_driver.py"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
FP32_TOL = 1e-5
BF16_UNIT_ROUNDOFF = 2.0**-9

TORCH_STRATEGIES = [
    "ddp",
    "ddp-ac",
    "ddp-bf16-reduce",
    "fsdp",
    "zero2",
    "hsdp",
    "fsdp-ac",
    "fsdp-bf16",
    "fsdp-bf16-reduce",
    "fsdp-offload",
]
COMPILED = "fsdp-compile-ac"  # runs in the matrix job, checked by its own test
BF16 = {"ddp-bf16-reduce", "fsdp-bf16", "fsdp-bf16-reduce"}
DS_STRATEGIES = [
    "deepspeed-zero0",
    "deepspeed-zero1",
    "deepspeed-zero2",
    "deepspeed-zero3",
    "deepspeed-zero3-offload",
]
MATRIX = TORCH_STRATEGIES + (DS_STRATEGIES if HAS_DEEPSPEED else [])
RESUMED = ["ddp", "zero2", "hsdp", "fsdp-offload"] + (
    ["deepspeed-zero1", "deepspeed-zero2", "deepspeed-zero3"] if HAS_DEEPSPEED else []
)

EXPECTED_FACTS: dict[str, dict] = {
    "ddp": {"engine": "TorchEngine", "wrapper": "DistributedDataParallel", "checkpointed_layers": 0},
    "ddp-ac": {"engine": "TorchEngine", "wrapper": "DistributedDataParallel", "checkpointed_layers": 2},
    "fsdp": {
        "engine": "TorchEngine",
        "all_dtensor": True,
        "mesh_shape": [2],
        "placements": ["S(0)"],
        "reshard_after_forward": True,
        "offload_to_cpu": False,
    },
    "zero2": {"all_dtensor": True, "mesh_shape": [2], "reshard_after_forward": False},
    "hsdp": {"all_dtensor": True, "mesh_shape": [2, 1], "placements": ["R", "S(0)"]},
    "fsdp-ac": {"all_dtensor": True, "checkpointed_layers": 1},
    "fsdp-bf16": {"all_dtensor": True},
    "fsdp-bf16-reduce": {"all_dtensor": True},
    "ddp-bf16-reduce": {"wrapper": "DistributedDataParallel"},
    "fsdp-offload": {"all_dtensor": True, "offload_to_cpu": True, "param_device": "cpu"},
    "deepspeed-zero0": {"engine": "DeepSpeedEngine", "wrapper": "DeepSpeedEngine", "zero_stage": 0},
    "deepspeed-zero1": {"zero_stage": 1, "optimizer": "DeepSpeedZeroOptimizer", "partition_gradients": False},
    "deepspeed-zero2": {"zero_stage": 2, "optimizer": "DeepSpeedZeroOptimizer", "partition_gradients": True},
    "deepspeed-zero3": {
        "zero_stage": 3,
        "optimizer": "DeepSpeedZeroOptimizer_Stage3",
        "ds_partitioned": True,
    },
    "deepspeed-zero3-offload": {"zero_stage": 3, "ds_partitioned": True, "offload_optimizer": True},
}


def _env() -> dict[str, str]:
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), str(HERE), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"  # 2 shared cores: more threads only spin
    env.setdefault("OVERDRIVE_DIST_TIMEOUT", "60")
    return env


def run_driver(tmp: Path, label: str, nproc: int, args: list[str], timeout: float) -> tuple[int, str, dict]:
    """Run the driver on `nproc` processes (torchrun when > 1); returns (exit code, output, results)."""
    out = tmp / f"{label}.json"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + [str(DRIVER), "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=tmp, env=_env(), capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    (tmp / f"{label}.log").write_text(output)
    results = json.loads(out.read_text()) if out.is_file() else {}
    return proc.returncode, output, results


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), f"{len(a)} values vs {len(b)}"
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def record_of(results: dict, name: str, output: str) -> dict:
    record = results.get(name)
    assert record is not None, f"{name} did not run:\n{output[-3000:]}"
    assert "error" not in record, f"{name} failed: {record['error']}\n{record.get('traceback', '')}"
    return record


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("parallel")


@pytest.fixture(scope="module")
def reference(work: Path) -> dict:
    """Single process, LocalEngine, accumulation 4; also saves at step 5 for the weight comparison."""
    rc, output, results = run_driver(
        work, "reference", 1, ["--strategies", "single", "--save-at", "5", "--ckpt-root", "ref"], 180
    )
    assert rc == 0, output[-3000:]
    return record_of(results, "single", output)


@pytest.fixture(scope="module")
def matrix(work: Path) -> tuple[str, dict]:
    """All strategies on 2 ranks, each saving a checkpoint at step 5 (first DeepSpeed use JIT-builds an op);
    the compiled one rides along to save a torchrun start."""
    args = ["--strategies", *MATRIX, COMPILED, "--save-at", "5", "--ckpt-root", "matrix"]
    rc, output, results = run_driver(work, "matrix", 2, args, 540)
    assert rc == 0, output[-3000:]
    return output, results


@pytest.mark.parametrize("name", MATRIX)
def test_losses_match_single_process(name: str, reference: dict, matrix: tuple[str, dict]) -> None:
    record = record_of(matrix[1], name, matrix[0])
    diff = max_diff(record["losses"], reference["losses"])
    print(f"{name}: max |loss - single| = {diff:.3e}")
    if name in BF16:
        tolerance = max(reference["losses"]) * BF16_UNIT_ROUNDOFF
        assert diff <= tolerance, f"bf16 loss differs by {diff} > {tolerance}"
        assert diff > 1e-7, "bf16 run is bit-identical to fp32: mixed precision was not applied"
        return
    assert diff <= FP32_TOL
    assert max_diff(record["grad_norms"], reference["grad_norms"]) <= FP32_TOL
    assert max_diff(record["lrs"], reference["lrs"]) <= 1e-12


@pytest.mark.parametrize("name", MATRIX)
def test_strategy_is_what_it_says(name: str, matrix: tuple[str, dict]) -> None:
    facts = record_of(matrix[1], name, matrix[0])["facts"]
    for key, expected in EXPECTED_FACTS[name].items():
        assert facts.get(key) == expected, f"{name}: {key} = {facts.get(key)!r}, expected {expected!r}"
    if facts.get("all_dtensor") and facts["mesh_shape"] == [2]:
        assert facts["local_numel"] < facts["numel"], "parameters are not sharded"


@pytest.mark.parametrize("name", [n for n in MATRIX if n not in BF16])
def test_full_state_dict_matches_single_process(
    name: str, work: Path, reference: dict, matrix: tuple
) -> None:
    """Gathered weights after 5 steps equal the single-process weights (same names, 1e-5)."""
    from safetensors.torch import load_file

    record_of(matrix[1], name, matrix[0])
    ours = load_file(str(work / "matrix" / f"{name}-5.full.safetensors"))
    ref = load_file(str(work / "ref" / "single-5.full.safetensors"))
    assert set(ours) == set(ref)
    worst = max(float((ours[k].float() - ref[k].float()).abs().max()) for k in ref)
    assert worst <= FP32_TOL, f"{name}: weights differ by {worst}"


@pytest.fixture(scope="module")
def killed(work: Path) -> tuple[int, str, dict]:
    """FSDP on 2 ranks, checkpoint at step 5, rank 1 SIGKILLed at the start of step 7."""
    args = [
        "--strategies",
        "fsdp",
        "--save-at",
        "5",
        "--kill-at",
        "7",
        "--kill-rank",
        "1",
        "--ckpt-root",
        "killed",
    ]
    return run_driver(work, "killed", 2, args, 180)


@pytest.fixture(scope="module")
def resumed(work: Path, matrix: tuple, killed: tuple) -> tuple[str, dict]:
    """Same world size: the killed FSDP run and the matrix checkpoints of the other engines, resumed at 5."""
    specs = [f"{n}={work / 'matrix' / f'{n}-5'}" for n in RESUMED] + [f"fsdp={work / 'killed' / 'fsdp-5'}"]
    rc, output, results = run_driver(
        work, "resumed", 2, ["--strategies", "fsdp", *RESUMED, "--resume", *specs], 300
    )
    assert rc == 0, output[-3000:]
    return output, results


def test_killed_rank_stops_the_job_and_leaves_a_complete_checkpoint(work: Path, killed: tuple) -> None:
    rc, output, results = killed
    assert rc != 0, "torchrun should report the SIGKILLed rank"
    assert "SIGKILL" in output or "Signal 9" in output
    assert (work / "killed" / "fsdp-5" / "overdrive-checkpoint.json").is_file()
    assert not any(p.name.endswith(".partial") for p in (work / "killed").iterdir())
    assert len(results["fsdp"]["losses"]) == 7  # steps 0..6 ran before the kill


def test_kill_and_resume_on_two_ranks_matches_uninterrupted(reference: dict, resumed: tuple) -> None:
    record = record_of(resumed[1], "fsdp", resumed[0])
    assert record["start_step"] == 5 and record["resumed_from_world"] == 2
    diff = max_diff(record["losses"], reference["losses"][5:])
    print(f"fsdp kill+resume 2 ranks: max |loss - uninterrupted| = {diff:.3e}")
    assert diff <= FP32_TOL


@pytest.mark.parametrize("name", RESUMED)
def test_resume_same_world_size(name: str, reference: dict, resumed: tuple) -> None:
    record = record_of(resumed[1], name, resumed[0])
    assert record["start_step"] == 5
    diff = max_diff(record["losses"], reference["losses"][5:])
    print(f"{name} resume at 5: max |loss - uninterrupted| = {diff:.3e}")
    assert diff <= FP32_TOL
    assert max_diff(record["lrs"], reference["lrs"][5:]) <= 1e-12


@pytest.fixture(scope="module")
def one_rank(work: Path, killed: tuple) -> tuple[str, dict]:
    """2 -> 1: the 2-rank FSDP checkpoint resumed by FSDP on one process (which saves at 7) and by LocalEngine."""
    args = ["--strategies", "fsdp", "single", "--resume", str(work / "killed" / "fsdp-5")]
    rc, output, results = run_driver(work, "one_rank", 1, [*args, "--save-at", "7", "--ckpt-root", "w1"], 180)
    assert rc == 0, output[-3000:]
    return output, results


@pytest.mark.parametrize("name", ["fsdp", "single"])
def test_reshard_two_to_one(name: str, reference: dict, one_rank: tuple) -> None:
    record = record_of(one_rank[1], name, one_rank[0])
    assert record["resumed_from_world"] == 2 and one_rank[1]["world_size"] == 1
    diff = max_diff(record["losses"], reference["losses"][5:])
    print(f"{name} 2->1 resume: max |loss - uninterrupted| = {diff:.3e}")
    assert diff <= FP32_TOL


def test_reshard_one_to_two(work: Path, reference: dict, one_rank: tuple) -> None:
    args = ["--strategies", "fsdp", "--resume", str(work / "w1" / "fsdp-7")]
    rc, output, results = run_driver(work, "two_from_one", 2, args, 180)
    assert rc == 0, output[-3000:]
    record = record_of(results, "fsdp", output)
    assert record["start_step"] == 7 and record["resumed_from_world"] == 1
    diff = max_diff(record["losses"], reference["losses"][7:])
    print(f"fsdp 1->2 resume: max |loss - uninterrupted| = {diff:.3e}")
    assert diff <= FP32_TOL


@pytest.mark.parametrize(
    "name", ["fsdp", "ddp"] + (["deepspeed-zero2", "deepspeed-zero3"] if HAS_DEEPSPEED else [])
)
def test_export_hf_from_checkpoint(name: str, work: Path, matrix: tuple, tmp_path: Path) -> None:
    """export_hf writes safetensors + config that from_pretrained loads, equal to the gathered weights."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from overdrive.parallel.checkpoint import export_hf

    record_of(matrix[1], name, matrix[0])
    out = export_hf(work / "matrix" / f"{name}-5", tmp_path / "hf")
    exported = load_file(str(out / "model.safetensors"))
    gathered = load_file(str(work / "matrix" / f"{name}-5.full.safetensors"))
    assert set(exported) == set(gathered)
    assert all(bool((exported[k] == gathered[k]).all()) for k in gathered)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert float((model.lm_head.weight.detach() - gathered["lm_head.weight"]).abs().max()) == 0.0


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed not installed")
def test_deepspeed_launcher_runs_the_engines(work: Path, reference: dict) -> None:
    """The `deepspeed` launcher's environment is read like torchrun's (RANK, WORLD_SIZE, LOCAL_RANK...)."""
    out = work / "ds_launcher.json"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--no_local_rank",
           "--master_port", str(_free_port()), str(DRIVER), "--strategies", "deepspeed-zero2", "--steps", "3",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=work, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    results = json.loads(out.read_text())
    record = record_of(results, "deepspeed-zero2", proc.stderr)
    assert results["world_size"] == 2 and record["facts"]["zero_stage"] == 2
    assert max_diff(record["losses"], reference["losses"][:3]) <= FP32_TOL


def test_compile_and_recompute_under_fsdp_match_single_process(
    reference: dict, matrix: tuple[str, dict]
) -> None:
    """torch.compile per decoder layer + full activation checkpointing + FSDP2 (cold inductor compile ~30 s)."""
    record = record_of(matrix[1], COMPILED, matrix[0])
    assert record["facts"]["compiled_layers"] == 2 and record["facts"]["checkpointed_layers"] == 2
    diff = max_diff(record["losses"], reference["losses"])
    print(f"fsdp-compile-ac: max |loss - single| = {diff:.3e}")
    assert diff <= FP32_TOL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["kill", "hang"])
def test_survivor_exits_with_a_message_when_peer_dies_or_hangs(mode: str, tmp_path: Path) -> None:
    """No torchrun agent: the surviving rank must notice by itself (gloo error, or the 5 s group timeout)."""
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = _env() | {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OVERDRIVE_DIST_TIMEOUT": "5",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE / "_peer_loss.py"), mode],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    began = time.monotonic()
    try:
        out0, _ = procs[0].communicate(timeout=60)
        elapsed = time.monotonic() - began
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait(timeout=10)
    print(f"{mode}: survivor exited after {elapsed:.1f} s: {out0.strip().splitlines()[-1]}")
    assert procs[0].returncode == 3, out0
    assert "lost contact with another rank" in out0
    assert elapsed < 60
