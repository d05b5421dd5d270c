"""Checkpoint mechanics in one process: atomic save, completion marker, latest, RNG, DCP <-> local format, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from overdrive.core.runtime import Runtime
from overdrive.errors import UsageError
from overdrive.parallel import Strategy, build_engine
from overdrive.parallel.checkpoint import (
    MARKER,
    capture_rng_state,
    export_hf,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    restore_rng_state,
    save_checkpoint,
)
from overdrive.parallel.engine import TorchEngine


def tiny_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def make_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def make_scheduler(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))


def train_steps(engine, steps: int = 2) -> list[float]:
    losses = []
    for step in range(steps):
        ids = torch.arange(16).remainder(64).roll(step).repeat(2, 1)
        loss = engine.model(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step(1.0)
        losses.append(loss.item())
    return losses


def local_engine(seed: int = 0):
    return build_engine(tiny_model(seed), Strategy(), Runtime(), make_optimizer, make_scheduler, 1.0, "fp32")


class DCPEngine(TorchEngine):
    """TorchEngine's DCP checkpoint code without a process group (what FSDP/DDP write, in one process)."""

    def __init__(self, seed: int = 0) -> None:
        model = tiny_model(seed)
        super().__init__(model, model, Runtime(), Strategy(), make_optimizer, make_scheduler)
        self.checkpoint_format = "dcp"


def params_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_save_is_atomic_and_marked_complete(tmp_path: Path) -> None:
    engine = local_engine()
    train_steps(engine)
    path = save_checkpoint(engine, tmp_path / "checkpoint-2", extra={"step": 2, "data": [1, 2]})
    meta = read_meta(path)
    assert meta["format"] == "local" and meta["world_size"] == 1 and meta["engine"] == "TorchEngine"
    assert json.loads((path / "extra" / "rank_0.json").read_text()) == {"step": 2, "data": [1, 2]}
    assert (path / "hf" / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]  # no temporary directory left


class CrashingEngine(TorchEngine):
    def save_checkpoint(self, directory: Path) -> None:
        (Path(directory) / "half-written.bin").write_bytes(b"x")
        raise RuntimeError("disk full")


def test_crash_mid_save_never_looks_complete(tmp_path: Path) -> None:
    good = local_engine()
    save_checkpoint(good, tmp_path / "step-1", extra={"step": 1})
    model = tiny_model()
    crashing = CrashingEngine(model, model, Runtime(), Strategy(), make_optimizer, make_scheduler)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(crashing, tmp_path / "step-2", extra={"step": 2})
    assert not (tmp_path / "step-2").exists()
    assert (tmp_path / ".step-2.partial").is_dir()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-1"
    with pytest.raises(UsageError, match="not an overdrive checkpoint"):
        read_meta(tmp_path / ".step-2.partial")
    save_checkpoint(good, tmp_path / "step-2", extra={"step": 2})  # the next save cleans up
    assert not (tmp_path / ".step-2.partial").exists()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-2"


def test_overwriting_a_checkpoint_replaces_it(tmp_path: Path) -> None:
    engine = local_engine()
    save_checkpoint(engine, tmp_path / "c", extra={"step": 1})
    save_checkpoint(engine, tmp_path / "c", extra={"step": 5})
    assert json.loads((tmp_path / "c" / "extra" / "rank_0.json").read_text()) == {"step": 5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_latest_checkpoint_picks_highest_complete_step(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "missing") is None
    for step in (2, 10, 7, 11):
        (tmp_path / f"step-{step}").mkdir()
        (tmp_path / f"step-{step}" / "model.bin").write_bytes(b"1234")
        marker = {"version": 2, "format": "local", "world_size": 1, "files": {"model.bin": 4}}
        (tmp_path / f"step-{step}" / MARKER).write_text(json.dumps(marker))
    (tmp_path / "step-12").mkdir()  # incomplete: no marker
    (tmp_path / "step-11" / "model.bin").write_bytes(b"12")  # torn after its marker was written
    (tmp_path / "checkpoint-20").mkdir()  # complete, but not the run's prefix
    (tmp_path / "checkpoint-20" / "model.bin").write_bytes(b"1234")
    (tmp_path / "checkpoint-20" / MARKER).write_text(json.dumps(marker))
    assert latest_checkpoint(tmp_path) == tmp_path / "step-10"


def test_local_resume_continues_identically(tmp_path: Path) -> None:
    a = local_engine()
    train_steps(a, 2)
    save_checkpoint(a, tmp_path / "ck", extra={"step": 2})
    expected = train_steps(a, 2)
    b = local_engine(seed=1)
    state = load_checkpoint(b, tmp_path / "ck")
    assert state.extra == {"step": 2} and state.same_world and state.saved_world_size == 1
    assert train_steps(b, 2) == expected


def test_dcp_checkpoint_resumes_in_local_engine(tmp_path: Path) -> None:
    """The format FSDP/DDP write loads into the single-process engine (world size N -> 1)."""
    a = DCPEngine()
    train_steps(a, 2)
    save_checkpoint(a, tmp_path / "ck", extra={"step": 2})
    assert read_meta(tmp_path / "ck")["format"] == "dcp" and (tmp_path / "ck" / "dcp" / ".metadata").is_file()
    expected = train_steps(a, 2)
    b = local_engine(seed=1)
    load_checkpoint(b, tmp_path / "ck")
    assert b.current_lr() == pytest.approx(1e-2 / 3)
    assert train_steps(b, 2) == pytest.approx(expected, abs=1e-6)


def test_local_checkpoint_resumes_in_dcp_engine(tmp_path: Path) -> None:
    """One process -> N ranks: optimizer.pt names each optimizer slot, so the state loads by parameter name."""
    a = local_engine()
    train_steps(a, 2)
    save_checkpoint(a, tmp_path / "ck", extra={"step": 2})
    expected = train_steps(a, 2)
    b = DCPEngine(seed=1)
    load_checkpoint(b, tmp_path / "ck")
    assert b.current_lr() == pytest.approx(1e-2 / 3)
    assert train_steps(b, 2) == pytest.approx(expected, abs=1e-6)


def test_local_checkpoint_without_parameter_names_names_the_fix(tmp_path: Path) -> None:
    import torch

    save_checkpoint(local_engine(), tmp_path / "ck")
    state = torch.load(tmp_path / "ck" / "optimizer.pt", weights_only=True)
    del state["param_names"]  # as written before the names were recorded
    torch.save(state, tmp_path / "ck" / "optimizer.pt")
    marker = json.loads((tmp_path / "ck" / MARKER).read_text())
    marker["files"]["optimizer.pt"] = (tmp_path / "ck" / "optimizer.pt").stat().st_size
    (tmp_path / "ck" / MARKER).write_text(json.dumps(marker))
    with pytest.raises(UsageError, match="before parameter names were recorded; resume it on one process"):
        load_checkpoint(DCPEngine(), tmp_path / "ck")


def test_deepspeed_mismatch_is_a_usage_error(tmp_path: Path) -> None:
    from overdrive.parallel.checkpoint import _check_deepspeed_compatible

    class Fake:
        runtime = Runtime(world_size=2)
        zero_stage = 2

    with pytest.raises(UsageError, match="written on 4 ranks"):
        _check_deepspeed_compatible(Fake(), {"world_size": 4, "strategy": {"zero_stage": 2}}, tmp_path)
    with pytest.raises(UsageError, match="written with ZeRO-3 and cannot resume with ZeRO-2"):
        _check_deepspeed_compatible(Fake(), {"world_size": 2, "strategy": {"zero_stage": 3}}, tmp_path)


@pytest.mark.parametrize("kind", ["local", "dcp"])
def test_export_hf_loads_with_from_pretrained(kind: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    engine = local_engine() if kind == "local" else DCPEngine()
    train_steps(engine, 1)
    save_checkpoint(engine, tmp_path / "ck")
    out = export_hf(tmp_path / "ck", tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert params_equal(loaded, engine.unwrapped_model())


def test_rng_state_round_trips_through_json() -> None:
    import random

    import numpy as np

    state = json.loads(json.dumps(capture_rng_state()))
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(1)
    np.random.seed(1)
    restore_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def test_activation_checkpointing_keeps_names_and_numerics() -> None:
    from overdrive.parallel.recompute import apply_activation_checkpointing

    plain, wrapped = tiny_model(), tiny_model()
    assert apply_activation_checkpointing(wrapped, every=2) == 1
    assert list(plain.state_dict()) == list(wrapped.state_dict())
    ids = torch.arange(16).repeat(2, 1)
    for model in (plain, wrapped):
        model(input_ids=ids, labels=ids).loss.backward()
    assert all(
        torch.equal(a.grad, b.grad) for a, b in zip(plain.parameters(), wrapped.parameters(), strict=True)
    )


def test_fp16_rejected_for_sharded_engines() -> None:
    with pytest.raises(UsageError, match="fp16 is supported with single and ddp only"):
        build_engine(
            tiny_model(),
            Strategy(data_parallel="fsdp"),
            Runtime(),
            make_optimizer,
            make_scheduler,
            1.0,
            "fp16",
        )
