"""Tensor parallelism (overdrive.parallel.tensor) against the plain single-process model, CPU gloo.

Two torchrun jobs run `_tp_driver.py`: 2 ranks with tp=2 (Llama tied/untied, with and without sequence
parallelism, Qwen3 with its per-head q/k norms, Mistral, Qwen2 with q/k/v biases, overdrive's kernels
patched in, and Gemma through its config's `base_model_tp_plan`), and 4 ranks with FSDP2 (dp_shard 2)
applied after TP on a 2-D mesh. Each rank also trains the plain model alone on the whole batch, so every
case compares in-process: step losses of 4 AdamW steps (1e-5 relative), every gradient after the first
backward gathered with `full_tensor()` (1e-5 relative to the tensor's largest entry), and the weights at
the end (5e-5 absolute, lr 3e-3: Adam turns fp32 reduction-order noise of near-zero gradients into weight
noise up to lr * noise / eps, so the driver uses eps 1e-5; observed <= 7e-6). The kernels cases patch every
overdrive kernel into the TP model while the reference stays plain HF.

The config checks are unit tests without processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"
DRIVER = HERE / "_tp_driver.py"
REL_TOL = 1e-5
WEIGHT_ATOL = 5e-5

TWO_RANKS = [
    "llama-tied-sp",
    "llama-tied",
    "llama-untied-sp",
    "qwen3-sp",
    "qwen3",
    "mistral-sp",
    "qwen2-sp",
    "llama-kernels-sp",
    "qwen3-kernels",
    "meta-qwen3-tied-sp",
    "gemma-generic",
]
FOUR_RANKS = ["fsdp-llama-tied-sp", "fsdp-qwen3-untied-kernels"]


def _run(tmp: Path, label: str, nproc: int, cases: list[str]) -> dict:
    out = tmp / f"{label}.json"
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), str(HERE), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += [str(DRIVER), "--out", str(out), "--cases", *cases]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    return _run(tmp_path_factory.mktemp("tp2"), "tp2", 2, TWO_RANKS)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> dict:
    return _run(tmp_path_factory.mktemp("tp4"), "fsdp_tp", 4, FOUR_RANKS)


def _record(results: dict, name: str) -> dict:
    record = results.get(name)
    assert record is not None, f"{name} did not run"
    assert "error" not in record, f"{name}: {record['error']}\n{record.get('traceback', '')}"
    return record


def _check_matches_single_process(name: str, record: dict) -> None:
    print(
        f"{name}: loss rel {record['loss_rel']:.2e}, grad rel {record['grad_rel']:.2e} "
        f"({record['grad_worst']}), weight abs {record['weight_abs']:.2e}"
    )
    assert record["loss_rel"] <= REL_TOL, (record["losses"], record["ref_losses"])
    assert record["grad_rel"] <= REL_TOL, f"gradient of {record['grad_worst']} differs"
    assert record["weight_abs"] <= WEIGHT_ATOL, f"weights of {record['weight_worst']} differ"


@pytest.mark.distributed
@pytest.mark.parametrize("name", TWO_RANKS)
def test_tp2_matches_single_process(name: str, two_ranks: dict) -> None:
    record = _record(two_ranks, name)
    _check_matches_single_process(name, record)
    placements = record["placements"]
    assert placements["model.layers.0.self_attn.q_proj.weight"] == ["Shard(dim=0)"]  # whole heads per rank
    assert placements["model.layers.0.self_attn.o_proj.weight"] == ["Shard(dim=1)"]
    assert placements["model.layers.0.mlp.down_proj.weight"] == ["Shard(dim=1)"]
    assert placements["model.embed_tokens.weight"] == ["Shard(dim=0)"]  # vocab-parallel
    assert record["partial_grads"] == 0, "replicated weights kept unreduced (Partial) gradients"


@pytest.mark.distributed
@pytest.mark.parametrize("name", [n for n in TWO_RANKS if n != "gemma-generic"])
def test_tp2_llama_family_layout(name: str, two_ranks: dict) -> None:
    record = _record(two_ranks, name)
    placements = record["placements"]
    assert placements["model.norm.weight"] == ["Replicate()"]
    assert record["tied"] == record["tied_config"], "tied embeddings must stay one parameter"
    if not record["tied_config"]:
        assert placements["lm_head.weight"] == ["Shard(dim=0)"]
    if name.startswith("qwen3"):
        assert placements["model.layers.0.self_attn.q_norm.weight"] == ["Replicate()"]
    expected = "sequence parallel" in record["notes"][-1]
    assert expected == name.endswith("-sp")


@pytest.mark.distributed
def test_tp2_kernels_run_under_tp(two_ranks: dict) -> None:
    """Every kernel stays patched in (match: see test_tp2_matches_single_process, against plain HF), and the
    loss comes from the vocab-parallel fused linear-CE: no logits were returned."""
    for name in ("llama-kernels-sp", "qwen3-kernels"):
        record = _record(two_ranks, name)
        assert set(record["kernels"]) == {"rms_norm", "rope", "swiglu", "fused_cross_entropy"}, record[
            "kernels"
        ]
        assert record["logits"] is False, f"{name}: the training forward built logits"
    assert _record(two_ranks, "llama-tied-sp")["logits"] is True


@pytest.mark.distributed
def test_tp2_generic_plan_without_sequence_parallel(two_ranks: dict) -> None:
    record = _record(two_ranks, "gemma-generic")
    assert any("sequence parallelism: not available" in note for note in record["notes"])
    assert record["placements"]["model.norm.weight"] == "plain"


@pytest.mark.distributed
@pytest.mark.parametrize("name", FOUR_RANKS)
def test_fsdp_tp_2d_matches_single_process(name: str, four_ranks: dict) -> None:
    record = _record(four_ranks, name)
    _check_matches_single_process(name, record)
    placements = record["placements"]
    assert all(len(p) == 2 for p in placements.values()), "every parameter should sit on the 2-D mesh"
    assert placements["model.layers.0.self_attn.o_proj.weight"] == ["Shard(dim=0)", "Shard(dim=1)"]
    assert placements["model.layers.0.input_layernorm.weight"] == ["Shard(dim=0)", "Replicate()"]
    assert record["tied"] == record["tied_config"]


# ---------------------------------------------------------------------------------------------- unit
def _config(model_type: str = "llama", **overrides):
    from transformers import AutoConfig

    values = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=256,
    )
    return AutoConfig.for_model(model_type, **{**values, **overrides})


@pytest.mark.parametrize(
    ("overrides", "tp", "words"),
    [
        ({"num_attention_heads": 6, "num_key_value_heads": 6, "hidden_size": 96}, 4, "6 attention heads"),
        ({"num_key_value_heads": 2}, 4, "2 key/value heads"),
        ({"intermediate_size": 130}, 4, "130 intermediate_size"),
        ({"vocab_size": 257}, 2, "--vocab-size a multiple of 2"),
    ],
)
def test_check_refuses_degrees_that_do_not_divide(overrides: dict, tp: int, words: str) -> None:
    from overdrive.errors import UsageError
    from overdrive.parallel.tensor import check_tensor_parallel

    with pytest.raises(UsageError, match=words) as info:
        check_tensor_parallel(_config(**overrides), tp)
    assert "\n" not in str(info.value)


def test_check_accepts_what_divides() -> None:
    from overdrive.modeling import LLAMA_PRESETS
    from overdrive.parallel.tensor import check_tensor_parallel

    for tp in (1, 2, 4):
        check_tensor_parallel(_config(), tp)
        check_tensor_parallel(_config("qwen3", head_dim=8), tp)
    check_tensor_parallel(_config(num_key_value_heads=2), 2)
    check_tensor_parallel(_config(vocab_size=257), 1)  # tp 1 needs nothing
    from transformers import LlamaConfig

    check_tensor_parallel(LlamaConfig(**LLAMA_PRESETS["llama3.2-1b"]), 8)


@pytest.mark.parametrize(
    ("model_type", "words"),
    [("gpt2", "model_type 'gpt2' has none"), ("phi3", "colwise_gather_output, rowwise_split_input")],
)
def test_check_refuses_architectures_without_a_usable_plan(model_type: str, words: str) -> None:
    from transformers import AutoConfig

    from overdrive.errors import UsageError
    from overdrive.parallel.tensor import check_tensor_parallel

    with pytest.raises(UsageError, match=words):
        check_tensor_parallel(AutoConfig.for_model(model_type), 2)


def test_check_refuses_a_degree_below_one() -> None:
    from overdrive.errors import UsageError
    from overdrive.parallel.tensor import check_tensor_parallel

    with pytest.raises(UsageError, match="must be >= 1"):
        check_tensor_parallel(_config(), 0)


def test_apply_refuses_a_model_that_is_not_shaped_like_its_type() -> None:
    """A Llama config on a model without the Llama projections: one line, before anything is sharded."""
    import torch
    from transformers import LlamaForCausalLM

    from overdrive.errors import UsageError
    from overdrive.parallel.tensor import apply_tensor_parallel

    model = LlamaForCausalLM(_config())
    model.model.layers[1].mlp.gate_proj = torch.nn.Identity()
    with pytest.raises(UsageError, match=r"no nn.Linear 'model.layers.1.mlp.gate_proj'"):
        apply_tensor_parallel(model, SimpleNamespace(size=lambda: 2))
    assert type(model.model.layers[0].self_attn.q_proj.weight) is torch.nn.Parameter  # untouched


def test_loss_context_is_a_no_op_without_tensor_parallelism() -> None:
    from transformers import LlamaForCausalLM

    from overdrive.parallel.tensor import is_vocab_parallel, tp_loss_context

    model = LlamaForCausalLM(_config())
    assert not is_vocab_parallel(model)
    with tp_loss_context(model):
        pass


def test_kernel_verdicts_cover_every_patch_feature() -> None:
    from overdrive.parallel.tensor import kernels_compatible_with_tp
    from overdrive.patches import _FEATURES

    for sequence_parallel in (True, False):
        verdicts = kernels_compatible_with_tp(sequence_parallel)
        assert set(verdicts) == set(_FEATURES)
        assert all(reason is None for reason in verdicts.values())  # each one is run by the kernel cases
