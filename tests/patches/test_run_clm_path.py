"""The one-line patch on run_clm.py's model-building path (issue 8).

transformers 5 builds ``from_pretrained`` models under ``torch.device("meta")`` and the requested
default dtype; the kernels' self-tests used to run in that context, fail, and cache the failure for the
process. The run_clm tests need fresh interpreters (the self-test cache is per process), so they run
``run_clm_child.py`` in subprocesses, patched and unpatched side by side.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from overdrive.patches import llama
from overdrive.patches._swap import is_swapped

CHILD = Path(__file__).with_name("run_clm_child.py")
LOG_PREFIX = "overdrive: kernels patched into LlamaForCausalLM"
KERNELS = ("fused_cross_entropy x1", "rms_norm x5", "rope x2", "swiglu x2")


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(path)  # safetensors
    assert (path / "model.safetensors").is_file()
    return path


def start_child(work: Path, *args: str) -> tuple[subprocess.Popen[str], Path]:
    work.mkdir(parents=True)
    result = work / "result.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSFORMERS_", "OVERDRIVE_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(CHILD), args[0], args[1], str(result), *args[2:]]
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, result


def finish_child(proc: subprocess.Popen[str], result: Path) -> tuple[dict[str, Any], str]:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{out}\n{err[-4000:]}"
    return json.loads(result.read_text()), err


def all_swapped(counts: dict[str, list[int]]) -> bool:
    return all(total > 0 and swapped == total for swapped, total in counts.values())


def test_run_clm_from_pretrained_is_patched_and_trains_like_unpatched(
    model_dir: Path, tmp_path: Path
) -> None:
    patched = start_child(tmp_path / "patched", "train", str(model_dir), "--patch")
    plain = start_child(tmp_path / "plain", "train", str(model_dir))
    (got, log), (ref, plain_log) = finish_child(*patched), finish_child(*plain)

    # What a run_clm user sees with default verbosity: one line naming every kernel and the model.
    lines = [line for line in log.splitlines() if LOG_PREFIX in line]
    assert len(lines) == 1, log[-4000:]
    assert str(model_dir) in lines[0] and all(k in lines[0] for k in KERNELS), lines[0]
    assert "fell back" not in lines[0] and "not patched" not in log, log[-4000:]
    assert "overdrive" not in plain_log
    assert all_swapped(got["swapped"]), got["swapped"]
    assert not any(swapped for swapped, _ in ref["swapped"].values()), ref["swapped"]

    assert len(got["losses"]) == len(ref["losses"]) == 4
    assert ref["losses"][-1] < ref["losses"][0]  # it really trained
    for mine, theirs in zip(
        got["losses"] + got["grad_norms"], ref["losses"] + ref["grad_norms"], strict=True
    ):
        assert abs(mine - theirs) <= 1e-5 * abs(theirs), (got, ref)


def test_meta_device_model_then_cpu_model_both_patched(model_dir: Path, tmp_path: Path) -> None:
    got, log = finish_child(*start_child(tmp_path / "meta", "meta-then-cpu", str(model_dir), "--patch"))
    assert all_swapped(got["meta"]), got
    assert all_swapped(got["cpu"]), got
    assert all_swapped(got["bf16_from_pretrained"]), got
    assert got["default_dtype"] == "torch.float32"
    assert "not patched" not in log, log[-4000:]


def test_self_tests_ignore_meta_device_and_default_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process twin of the meta test: with an empty pass cache, checks run inside the contexts
    transformers 5 uses while building a model (meta device, bf16 default dtype) still pass."""
    monkeypatch.setattr(llama, "_SELF_CHECKS_PASSED", set())
    previous = torch.get_default_dtype()
    with torch.device("meta"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = LlamaForCausalLM(tiny_llama_config())
            reasons = (
                llama.check_rms_norm(model.model.norm),
                llama.check_mlp(model.model.layers[0].mlp),
                llama.check_rope("llama"),
            )
            assert torch.get_default_dtype() == torch.bfloat16  # restored after the self-tests
        finally:
            torch.set_default_dtype(previous)
    assert reasons == (None, None, None)


def test_a_failed_self_test_is_not_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama, "_SELF_CHECKS_PASSED", set())
    calls: list[int] = []

    def flaky() -> str | None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("Tensor.item() cannot be called on meta tensors")
        return None

    first = llama._self_check("probe", flaky, flaky)
    assert first is not None and "meta tensors" in first
    assert llama._self_check("probe", flaky, flaky) is None  # re-run, not the cached failure
    assert llama._self_check("probe", flaky, flaky) is None and len(calls) == 2  # a pass is cached


def test_patch_model_logs_one_line_only_when_it_patches() -> None:
    import overdrive
    from overdrive.patches import logger

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        model = LlamaForCausalLM(tiny_llama_config())
        overdrive.patch_model(model)
        overdrive.patch_model(model)  # idempotent: nothing new swapped, no second line
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [r.getMessage() for r in records if LOG_PREFIX in r.getMessage()]
    assert len(lines) == 1 and all(k in lines[0] for k in KERNELS), lines
    assert records[0].levelno == logging.INFO and is_swapped(model.model.norm)
