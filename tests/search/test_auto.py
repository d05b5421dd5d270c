"""`--strategy auto` / `--precision auto`: pins, the tune cache, the measured choice, the run dir and resume."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from overdrive.cli import main
from overdrive.config import build_config
from overdrive.search import auto_measure
from overdrive.search.auto import CHOICE_FILE, Choice, choose
from overdrive.search.auto_measure import Measurement, Probe
from tests.conftest import micro_args

AUTO = ("--strategy", "auto", "--precision", "auto")  # micro_args pins single/fp32; these runs test auto


def micro_cfg(micro_config: Path, text_file: Path, **values: Any) -> Any:
    base = {
        "model_config": str(micro_config),
        "train_file": str(text_file),
        "vocab_size": 512,
        "block_size": 64,
        "max_steps": 4,
    }
    return build_config({}, {**base, **values})


class FakeMeasurer:
    """Tokens/s per probe from a table (default 1000); records what it was asked to measure."""

    def __init__(self, rates: dict[str, float] | None = None, first_step_s: float = 0.1) -> None:
        self.rates = rates or {}
        self.first_step_s = first_step_s
        self.asked: list[Probe] = []

    def __call__(self, model_config: Any, cfg: Any, probes: Sequence[Probe]) -> dict[Probe, Measurement]:
        self.asked += probes
        tokens = (cfg.micro_batch_size or 8) * cfg.block_size  # any row count: only the ratio is read
        out = {}
        for p in probes:
            rate = self.rates.get(p.label, 1000.0)
            out[p] = Measurement(tokens / rate, self.first_step_s, rate)
        return out


def never(*_: Any) -> dict[Probe, Measurement]:
    raise AssertionError("auto measured although it must not")


def test_measurement_chooses_the_faster_candidate(micro_config: Path, text_file: Path) -> None:
    cfg = micro_cfg(micro_config, text_file)
    fake = FakeMeasurer({"bf16 kernels": 3000.0, "fp32 kernels": 2000.0, "fp32 plain": 1500.0})
    choice = choose(cfg, 1, measurer=fake)
    assert (choice.precision, choice.strategy.kernels, choice.strategy.compile) == ("bf16", True, False)
    assert choice.source == "measured" and choice.auto == ("strategy", "precision")
    assert {p.precision for p in fake.asked} == {"fp32", "bf16"}  # bf16 is measured, never assumed
    assert {p.kernels for p in fake.asked} == {True, False}
    assert not any(p.compile for p in fake.asked)  # 4 steps cannot repay compiling
    assert "measured 3,000 vs 1,500 tok/s plain" in choice.line()
    assert "compile not tried" in choice.reason

    slow_bf16 = FakeMeasurer({"bf16 kernels": 900.0, "bf16 plain": 800.0, "fp32 plain": 2500.0})
    choice = choose(cfg, 1, measurer=slow_bf16)
    assert (choice.precision, choice.strategy.kernels) == ("fp32", False)
    assert "bf16 slower here" in choice.reason


def test_compile_only_when_it_repays(micro_config: Path, text_file: Path) -> None:
    long_run = micro_cfg(micro_config, text_file, max_steps=100_000)
    rates = {"fp32 kernels": 2000.0, "fp32 kernels+compile": 3000.0}
    fake = FakeMeasurer(rates, first_step_s=30.0)  # 30 s to compile, repaid over 100k steps
    choice = choose(long_run, 1, measurer=fake)
    assert choice.strategy.compile and choice.strategy.kernels and choice.precision == "fp32"
    assert Probe("fp32", True, True) in fake.asked and "repaid over the run" in choice.reason

    medium = micro_cfg(micro_config, text_file, max_steps=2_000)  # ~500 s eager: tried, but 1 h of compile
    fake = FakeMeasurer(rates, first_step_s=3600.0)
    choice = choose(medium, 1, measurer=fake)
    assert not choice.strategy.compile and "not repaid" in choice.reason


def test_flags_pin_their_axis(micro_config: Path, text_file: Path) -> None:
    cfg = micro_cfg(micro_config, text_file, kernels=False, precision="bf16")
    fake = FakeMeasurer({"bf16 kernels": 9000.0})
    choice = choose(cfg, 1, measurer=fake)
    assert all(p.precision == "bf16" and not p.kernels for p in fake.asked)
    assert choice.precision == "bf16" and not choice.strategy.kernels
    assert choice.auto == ("strategy",)

    recompute = micro_cfg(micro_config, text_file, activation_checkpointing=True, compile=True)
    choice = choose(recompute, 1, measurer=FakeMeasurer())
    assert choice.strategy.activation_checkpointing != "none" and choice.strategy.compile

    pinned = micro_cfg(micro_config, text_file, strategy="single", precision="fp32")
    choice = choose(pinned, 1, measurer=never)
    assert (choice.source, choice.precision, choice.auto) == ("flags", "fp32", ())
    assert not choice.strategy.kernels and not choice.strategy.compile  # the old default, exactly


def test_precision_auto_with_a_named_strategy(micro_config: Path, text_file: Path) -> None:
    cfg = micro_cfg(micro_config, text_file, strategy="single", kernels=True)
    fake = FakeMeasurer({"bf16 kernels": 1200.0, "fp32 kernels": 1100.0})
    choice = choose(cfg, 1, measurer=fake)
    assert choice.precision == "bf16" and choice.auto == ("precision",)
    assert {(p.precision, p.kernels) for p in fake.asked} == {("fp32", True), ("bf16", True)}
    assert choice.line().startswith("overdrive: precision auto -> bf16 (measured")


def test_cached_tune_result_is_used_without_measuring(
    micro_config: Path, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from overdrive.parallel.strategy import Strategy
    from overdrive.search import cache

    monkeypatch.setenv("OVERDRIVE_CACHE_DIR", str(tmp_path / "cache"))
    cfg = micro_cfg(micro_config, text_file)
    tuned = Strategy(kernels=True, compile=False)
    result = {
        "strategy": tuned.to_dict(),
        "precision": "bf16",
        "micro_batch_size": 4,
        "tokens_per_sec": 4321.0,
    }
    cache.store_tuned(cache.key_for_config(cfg, 1, "cpu"), result)
    choice = choose(cfg, 1, measurer=never)
    assert choice.source == "cache" and choice.precision == "bf16"
    assert choice.strategy.kernels and choice.strategy.micro_batch_size == 4
    assert "4,321 tok/s" in choice.reason
    # an explicit flag still wins over the cached axis
    choice = choose(micro_cfg(micro_config, text_file, kernels=False, precision="fp32"), 1, measurer=never)
    assert not choice.strategy.kernels and choice.precision == "fp32"


def test_several_ranks_decide_from_the_plan_alone(micro_config: Path, text_file: Path) -> None:
    cfg = micro_cfg(micro_config, text_file, micro_batch_size=4)  # 2 ranks × 4 rows = the global batch
    choice = choose(cfg, 2, measurer=never)
    assert choice.source == "plan" and choice.precision == "fp32"
    assert choice.strategy.data_parallel in ("ddp", "fsdp") and not choice.strategy.compile
    assert choose(cfg, 2, measurer=never).to_dict() == choice.to_dict()  # every rank decides the same


def test_choice_round_trips() -> None:
    from overdrive.parallel.strategy import Strategy

    choice = Choice(
        Strategy(kernels=True, compile=True), "fp32", "measured", "why", ("strategy",), {"a": 1.0}
    )
    again = Choice.from_dict(json.loads(json.dumps(choice.to_dict())))
    assert again.to_dict() == choice.to_dict()
    assert choice.line() == "overdrive: strategy auto -> kernels+compile, fp32 (why)"


def run_summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


def test_run_records_and_resume_reuses_the_choice(
    micro_config: Path, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    run = tmp_path / "run"
    fake = FakeMeasurer({"bf16 kernels": 5000.0})  # an unusual pick, so that reusing it is visible
    monkeypatch.setattr(auto_measure, "measure", fake)
    args = micro_args(micro_config, text_file, run, *AUTO, "--max-steps", "4", "--save-steps", "2", "--no-quiet")
    assert main(args) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("overdrive: strategy auto -> ")]
    assert lines == [
        "overdrive: strategy auto -> kernels, bf16 (measured 5,000 vs 1,000 tok/s plain; "
        "fp32 slower here (1,000); compile not tried: a run of ~0 s cannot repay compiling)"
    ]
    summary = run_summary(run)
    recorded = summary["strategy_choice"]
    assert recorded["precision"] == "bf16" and recorded["strategy"]["kernels"] is True
    assert recorded["source"] == "measured" and recorded["measured_tokens_per_sec"]["bf16 kernels"] == 5000.0
    assert summary["config"]["precision"] == "bf16"  # config.yaml holds what ran
    assert json.loads((run / CHOICE_FILE).read_text()) == recorded

    # resume: the stored choice, not a new measurement (which would now pick fp32 plain)
    monkeypatch.setattr(auto_measure, "measure", never)
    (run / "summary.json").unlink()
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-0000004")
    assert main([*args, "--resume", "latest"]) == 0
    resumed = run_summary(run)["strategy_choice"]
    assert resumed["source"] == "resumed" and resumed["precision"] == "bf16"
    assert resumed["strategy"] == recorded["strategy"]


def test_default_run_measures_for_real(micro_config: Path, text_file: Path, tmp_path: Path) -> None:
    """No flags: the real quick measurement runs and the run records a concrete precision."""
    run = tmp_path / "run"
    assert main(micro_args(micro_config, text_file, run, *AUTO, "--max-steps", "2")) == 0
    choice = run_summary(run)["strategy_choice"]
    assert choice["source"] == "measured" and choice["precision"] in ("fp32", "bf16")
    assert set(choice["measured_tokens_per_sec"]) == {
        "fp32 plain",
        "fp32 kernels",
        "bf16 plain",
        "bf16 kernels",
    }
    assert all(rate > 0 for rate in choice["measured_tokens_per_sec"].values())
    config = (run / "config.yaml").read_text()
    assert f"precision: {choice['precision']}" in config and "strategy: auto" in config
