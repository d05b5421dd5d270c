"""Meta-device construction: layout-independent init and streamed loading into local shards.

One process: `materialize` gives the same weights for the same seed, HF's init statistics, HF's rotary buffers
and kept ties. Under torchrun (gloo): FSDP2 on 2 and 4 ranks, HSDP 2 x 2 and dp 2 x tp 2 gather to exactly the
one-process weights and compute the same loss; `load_weights` on 2 FSDP ranks gathers to exactly the saved
checkpoint.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from overdrive.errors import UsageError
from overdrive.parallel.materialize import build_meta_model, load_weights, materialize, meta_reference

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"
DRIVER = HERE / "_materialize_driver.py"
_spec = importlib.util.spec_from_file_location("_materialize_driver", DRIVER)
driver = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(driver)


def built(tied: bool = True, seed: int = driver.SEED, dtype: str = "float32") -> LlamaForCausalLM:
    model = build_meta_model(driver.tiny_config(tied), "sdpa", dtype)
    materialize(model, meta_reference(model), seed=seed, device="cpu")
    return model


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_equal_state(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    unequal = [k for k in want if not torch.equal(got[k], want[k])]
    assert not unequal, f"differ: {unequal[:5]}"


# ------------------------------------------------------------------------------------------ one process


def test_build_meta_model_holds_no_memory() -> None:
    model = build_meta_model(driver.tiny_config(True), "sdpa", "float32")
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("tied", [True, False])
def test_same_seed_same_weights_other_seed_other_weights(tied: bool) -> None:
    first, second, other = state(built(tied)), state(built(tied)), state(built(tied, seed=12))
    assert_equal_state(second, first)
    for name, value in first.items():
        if name.endswith("proj.weight") or "embed" in name or "lm_head" in name:
            assert not torch.equal(other[name], value), f"{name} ignores the seed"


@pytest.mark.parametrize("tied", [True, False])
def test_statistics_and_buffers_match_hf_init(tied: bool) -> None:
    config = driver.tiny_config(tied)
    ours, theirs = built(tied), LlamaForCausalLM(config)
    std = config.initializer_range
    for name, value in ours.state_dict().items():
        if name.endswith("norm.weight"):
            assert torch.equal(value, torch.ones_like(value)), name
        else:
            assert abs(value.std().item() - std) < 0.05 * std, (name, value.std().item())
            assert abs(value.mean().item()) < 0.1 * std, name
            assert abs(value.std().item() - theirs.get_parameter(name).std().item()) < 0.1 * std, name
    for buffer in ("inv_freq", "original_inv_freq"):
        want = getattr(theirs.model.rotary_emb, buffer)
        assert torch.equal(getattr(ours.model.rotary_emb, buffer), want), buffer
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) is tied


def test_low_precision_is_the_fp32_init_cast() -> None:
    fp32, bf16 = state(built()), built(dtype="bfloat16")
    assert bf16.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert_equal_state(state(bf16), {k: v.to(bf16.get_parameter(k).dtype) for k, v in fp32.items()})


def test_an_init_that_leaves_a_tensor_unset_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_meta_model(driver.tiny_config(True), "sdpa", "float32")
    from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

    monkeypatch.setattr(LlamaPreTrainedModel, "_init_weights", lambda self, module: None, raising=False)
    with pytest.raises(UsageError, match="leaves model.embed_tokens.weight unset"):
        materialize(model, meta_reference(model), seed=1, device="cpu")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tied tiny Llama written by save_pretrained (one safetensors file, no lm_head key)."""
    path = tmp_path_factory.mktemp("ckpt") / "tied"
    torch.manual_seed(5)
    LlamaForCausalLM(driver.tiny_config(True)).save_pretrained(path)
    return path


def loaded(path: Path, dtype: str = "float32") -> LlamaForCausalLM:
    from transformers import AutoConfig

    model = build_meta_model(AutoConfig.from_pretrained(path), "sdpa", dtype)
    load_weights(model, meta_reference(model), path, "cpu")
    return model


def test_load_weights_tied_single_file(saved: Path) -> None:
    files = load_file(saved / "model.safetensors")
    assert "lm_head.weight" not in files
    model = loaded(saved)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_equal_state({k: v for k, v in state(model).items() if k in files}, files)
    want = LlamaForCausalLM(driver.tiny_config(True)).model.rotary_emb.inv_freq
    assert torch.equal(model.model.rotary_emb.inv_freq, want)


def test_load_weights_sharded_index_and_dtype_conversion(tmp_path: Path) -> None:
    source = LlamaForCausalLM(driver.tiny_config(False)).to(torch.bfloat16)
    source.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    model = loaded(tmp_path, "float32")
    assert model.lm_head.weight.dtype == torch.float32
    assert_equal_state(state(model), {k: v.float() for k, v in source.state_dict().items()})


def test_load_weights_from_a_base_model_checkpoint(tmp_path: Path, saved: Path) -> None:
    """A checkpoint of the bare decoder (no `model.` prefix) fills the causal LM, tied head included."""
    files = load_file(saved / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in files.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    model = loaded(tmp_path)
    assert torch.equal(model.lm_head.weight, files["model.embed_tokens.weight"])


def broken_copy(saved: Path, tmp_path: Path, edit) -> Path:  # noqa: ANN001
    files = load_file(saved / "model.safetensors")
    edit(files)
    save_file(files, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    return tmp_path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: f.pop("model.layers.1.mlp.up_proj.weight"), "missing 1 tensor.*layers.1.mlp.up_proj"),
        (lambda f: f.update(extra=torch.zeros(2)), "1 tensor.*does not have.*extra"),
        (lambda f: f.update({"model.norm.weight": torch.ones(3)}), r"model.norm.weight has shape \(3,\)"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_load_weights_refuses_bad_checkpoints_before_allocating(
    saved: Path, tmp_path: Path, edit, message: str
) -> None:  # noqa: ANN001
    path = broken_copy(saved, tmp_path, edit)
    model = build_meta_model(driver.tiny_config(True), "sdpa", "float32")
    with pytest.raises(UsageError, match=message):
        load_weights(model, meta_reference(model), path, "cpu")
    assert all(p.is_meta for p in model.parameters()), "nothing may be allocated on a refused checkpoint"


def test_load_weights_without_safetensors(tmp_path: Path) -> None:
    model = build_meta_model(driver.tiny_config(True), "sdpa", "float32")
    with pytest.raises(UsageError, match="no \\*.safetensors"):
        load_weights(model, meta_reference(model), tmp_path, "cpu")
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UsageError, match="model.safetensors is not a readable safetensors file"):
        load_weights(model, meta_reference(model), tmp_path, "cpu")


# ------------------------------------------------------------------------------------------- torchrun


def run_driver(tmp: Path, nproc: int, cases: list[str], checkpoint: Path | None = None) -> dict[str, dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += [str(DRIVER), "--out", str(tmp), *cases]
    if checkpoint is not None:
        cmd += ["--checkpoint", str(checkpoint)]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    out = {}
    for case in cases:
        path = tmp / f"{case}-{nproc}.pt"
        assert path.is_file(), (
            f"{case} on {nproc} ranks wrote nothing:\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
        record = torch.load(path, weights_only=False)
        assert "error" not in record, f"{case}: {record['error']}\n{record['traceback']}"
        out[case] = record
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory, saved: Path) -> dict[str, dict]:
    return run_driver(tmp_path_factory.mktemp("two"), 2, ["fsdp-tied", "fsdp-untied", "load"], saved)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    return run_driver(tmp_path_factory.mktemp("four"), 4, ["fsdp-tied", "hsdp", "tp2d"])


def check_against_one_process(record: dict, model: torch.nn.Module, world: int) -> None:
    assert_equal_state(record["state_dict"], state(model))
    assert abs(record["loss"] - driver.probe_loss(model)) < 1e-5
    placements = record["facts"]["placements"]
    assert set(placements) == {n for n, _ in model.named_parameters()}, "every parameter must be a DTensor"
    sizes = [world] if all(len(p) == 1 for p in placements.values()) else [2, world // 2]  # 2-D: (2, N/2)
    most = 0  # the largest part a rank may hold: dim-0 rows over the product of its sharded mesh dims
    for name, p in model.named_parameters():
        dims = sizes[
            : len(placements[name])
        ]  # 2-D run, 1-D placement: FSDP over dp only (not tensor parallel)
        parts = math.prod(size for size, pl in zip(dims, placements[name], strict=True) if pl != "R")
        most += -(-p.shape[0] // parts) * (p.numel() // p.shape[0])
    assert record["facts"]["local_numel"] <= most < sum(p.numel() for p in model.parameters())
    assert record["facts"]["tied"] == (model.lm_head.weight is model.model.embed_tokens.weight)


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["fsdp-tied", "fsdp-untied"])
def test_fsdp_two_ranks_start_from_the_one_process_weights(two_ranks: dict, case: str) -> None:
    record = two_ranks[case]
    assert set(map(tuple, record["facts"]["placements"].values())) == {("S(0)",)}
    check_against_one_process(record, built(tied=case == "fsdp-tied"), 2)


@pytest.mark.distributed
def test_fsdp_four_ranks_start_from_the_one_process_weights(four_ranks: dict) -> None:
    check_against_one_process(four_ranks["fsdp-tied"], built(), 4)


@pytest.mark.distributed
def test_hsdp_starts_from_the_one_process_weights(four_ranks: dict) -> None:
    record = four_ranks["hsdp"]
    assert set(map(tuple, record["facts"]["placements"].values())) == {("R", "S(0)")}
    check_against_one_process(record, built(), 4)


@pytest.mark.distributed
def test_fsdp_times_tp_starts_from_the_one_process_weights(four_ranks: dict) -> None:
    record = four_ranks["tp2d"]
    placements = record["facts"]["placements"]
    assert placements["model.layers.0.self_attn.q_proj.weight"][1] == "S(0)"
    assert placements["model.layers.0.mlp.down_proj.weight"][1] == "S(1)"
    check_against_one_process(record, built(), 4)


@pytest.mark.distributed
def test_load_weights_into_fsdp_two_ranks_equals_the_checkpoint(two_ranks: dict, saved: Path) -> None:
    record = two_ranks["load"]
    files = load_file(saved / "model.safetensors")
    got = record["state_dict"]
    assert sorted(got) == sorted([*files, "lm_head.weight"])
    assert_equal_state({k: got[k] for k in files}, files)
    assert torch.equal(got["lm_head.weight"], files["model.embed_tokens.weight"])
    assert record["facts"]["tied"]
    assert abs(record["loss"] - driver.probe_loss(loaded(saved))) < 1e-5
