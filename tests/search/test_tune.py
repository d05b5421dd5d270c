"""`overdrive tune`: trials measured from real runs, failures recorded as infeasible, the outputs, the cache."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from overdrive.cli import main
from overdrive.config import TrainConfig
from overdrive.parallel.strategy import Strategy
from overdrive.search import cache, trial
from overdrive.search.trial import TrialResult, TrialSpec, run_trial
from tests.conftest import cli_error, micro_args


def micro_cfg(micro_config: Path, text_file: Path, **changes: object) -> TrainConfig:
    values = dict(
        model_config=str(micro_config),
        train_file=str(text_file),
        vocab_size=512,
        block_size=64,
        global_batch_size=8,
    )
    values.update(changes)
    return TrainConfig(**values)


def tune_args(micro_config: Path, text_file: Path, out: Path, *extra: str) -> list[str]:
    return ["tune", *micro_args(micro_config, text_file, out, "--global-batch-size", "8", *extra)[1:]]


def test_trial_measures_a_real_run(micro_config: Path, text_file: Path, tmp_path: Path) -> None:
    spec = TrialSpec(Strategy(kernels=True, micro_batch_size=4), "fp32")
    result = run_trial(micro_cfg(micro_config, text_file), spec, tmp_path / "t", timed_steps=3, timeout=300)
    assert result.status == "ok", result.error
    records = [
        json.loads(line) for line in (tmp_path / "t" / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # one warm-up step + 3 timed, every step logged
    rates = [r["tokens_per_sec"] for r in records[1:]]
    assert result.step_rates == pytest.approx(rates)
    assert result.tokens_per_sec == pytest.approx(statistics.median(rates))
    assert result.peak_memory_bytes == max(r["peak_memory_bytes"] for r in records) > 0
    ran = yaml.safe_load((tmp_path / "t" / "run" / "config.yaml").read_text())
    assert (ran["micro_batch_size"], ran["kernels"], ran["export"], ran["max_new_tokens"]) == (
        4,
        True,
        False,
        0,
    )
    assert not (tmp_path / "t" / "run" / "final").exists()


def test_crash_and_timeout_are_infeasible(micro_config: Path, text_file: Path, tmp_path: Path) -> None:
    spec = TrialSpec(Strategy(micro_batch_size=4), "fp32")
    broken = micro_cfg(micro_config, text_file, train_file=str(tmp_path / "missing.txt"))
    crash = run_trial(broken, spec, tmp_path / "crash", timed_steps=1, timeout=300)
    assert (crash.status, crash.tokens_per_sec) == ("crash", None)
    assert "missing.txt" in crash.error
    slow = run_trial(micro_cfg(micro_config, text_file), spec, tmp_path / "slow", timed_steps=1, timeout=0.5)
    assert (slow.status, slow.tokens_per_sec) == ("timeout", None)
    assert not (tmp_path / "slow" / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "code",
    [
        "print('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB'); raise SystemExit(1)",
        "bytearray(1 << 62)",  # a real MemoryError
        "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",  # what the kernel's OOM killer does
    ],
)
def test_out_of_memory_is_infeasible(
    code: str, micro_config: Path, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trial, "train_command", lambda config, nproc: [sys.executable, "-c", code])
    result = run_trial(micro_cfg(micro_config, text_file), TrialSpec(Strategy(), "fp32"), tmp_path, 1, 60)
    assert (result.status, result.tokens_per_sec) == ("oom", None)


def test_search_tells_optuna_infeasible_not_zero(
    micro_config: Path, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fake trials: bf16 OOMs, the rest measure by a formula; the sampler sees PRUNED, never 0, and the
    search finds the best point in well under the grid's size."""
    import optuna

    from overdrive.search import tune
    from overdrive.search.hardware import DEVICES
    from overdrive.search.plan import plan

    def fake(base, spec, run_dir, steps, timeout):  # noqa: ANN001, ANN202
        s = spec.strategy
        if spec.precision == "bf16":
            return TrialResult("oom", error="out of memory", run_dir=str(run_dir))
        rate = (
            1000.0
            + 300 * s.kernels
            + 200 * s.compile
            + 50 * spec.micro
            - 400 * (s.activation_checkpointing != "none")
        )
        return TrialResult("ok", tokens_per_sec=rate, run_dir=str(run_dir))

    studies = []
    create = optuna.create_study
    monkeypatch.setattr(optuna, "create_study", lambda **kw: studies.append(create(**kw)) or studies[-1])
    monkeypatch.setattr(tune, "run_trial", fake)
    cfg = micro_cfg(micro_config, text_file)
    shape = cache.model_shape(cfg)
    ranked = plan(shape, 64, 8, DEVICES["cpu"], 1, 1)
    space = tune.build_space(ranked, {"recompute": {"none", "full"}}, 1, None)
    grid = space.feasible_points()
    assert len(grid) == 2 * 2 * 2 * 4 * 2  # precision × kernels × compile × micro 1/2/4/8 × recompute
    history = tune.search(space, cfg, tmp_path, len(grid) // 4, 0, 1, None, 1, 60, report=lambda line: None)
    assert len(history) == len(grid) // 4
    best = tune.best_trials(history)[0]
    assert best.point == tune.Point("fp32", True, True, 8, "none", "single")
    ooms = [t for t in history if t.result.status == "oom"]
    assert ooms and all(t.tokens_per_sec is None for t in ooms)
    study = studies[0]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.value for t in done) == sorted(t.tokens_per_sec for t in history if t.result.ok)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert len(pruned) == len(ooms) and all(t.value is None for t in pruned)  # infeasible, not 0
    assert {t.user_attrs["status"] for t in pruned} == {"oom"}


def noisy_fake(calls: dict) -> object:
    """Fake trials measured by a formula, except the first run of two close points: the best one reads
    low and the runner-up high, as one short run on a shared machine can."""
    first_read = {(True, True, 8): 1750.0, (True, True, 4): 1800.0}

    def fake(base, spec, run_dir, steps, timeout):  # noqa: ANN001, ANN202
        s = spec.strategy
        key = (s.kernels, s.compile, spec.micro)
        calls[key] = calls.get(key, 0) + 1
        if spec.precision == "bf16" or s.activation_checkpointing != "none":
            return TrialResult("oom", error="out of memory", run_dir=str(run_dir))
        rate = 1000.0 + 300 * s.kernels + 200 * s.compile + 50 * spec.micro
        if calls[key] == 1 and key in first_read:
            rate = first_read[key]
        return TrialResult("ok", tokens_per_sec=rate, run_dir=str(run_dir))

    return fake


@pytest.mark.parametrize("confirm", [0, 3])
def test_remeasuring_the_fastest_points_undoes_one_noisy_run(
    confirm: int, micro_config: Path, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from overdrive.search import tune
    from overdrive.search.hardware import DEVICES
    from overdrive.search.plan import plan

    calls: dict = {}
    monkeypatch.setattr(tune, "run_trial", noisy_fake(calls))
    cfg = micro_cfg(micro_config, text_file)
    ranked = plan(cache.model_shape(cfg), 64, 8, DEVICES["cpu"], 1, 1)
    space = tune.build_space(ranked, {"recompute": {"none"}, "precision": {"fp32"}}, 1, None)
    trials = 12
    history = tune.search(space, cfg, tmp_path, trials, 0, 1, None, 1, 60, lambda line: None, confirm)
    assert len(history) == trials
    reruns = [t for t in history if t.source == "confirm"]
    assert len(reruns) == confirm
    searched = history[: trials - confirm]
    assert {(True, True, 8), (True, True, 4)} <= {
        (t.point.kernels, t.point.compile, t.point.micro) for t in searched
    }
    best = tune.best_trials(history)[0]
    if confirm:  # leader, runner-up, leader by single runs, run again back to back, each in its own directory
        single = sorted(searched, key=lambda t: -(t.tokens_per_sec or 0))[:2]
        assert [t.point for t in reruns] == [single[0].point, single[1].point, single[0].point]
        assert len({t.result.run_dir for t in history}) == trials
        assert best.point == tune.Point("fp32", True, True, 8, "none", "single")
        assert tune.point_rate(history, best.point) == pytest.approx((1750.0 + 1900.0) / 2)
    else:  # one run each: the runner-up's lucky run wins
        assert best.point == tune.Point("fp32", True, True, 4, "none", "single")


def test_confirm_takes_at_most_a_quarter_of_the_budget() -> None:
    from overdrive.search.tune import confirm_count

    assert [confirm_count(n, 3) for n in (2, 4, 8, 12, 40)] == [0, 1, 2, 3, 3]
    assert confirm_count(12, 0) == 0


def test_tune_writes_outputs_and_best_trains(
    micro_config: Path,
    text_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("OVERDRIVE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "tune"
    argv = tune_args(
        micro_config,
        text_file,
        out,
        "--trials",
        "2",
        "--trial-steps",
        "2",
        "--space",
        "precision=fp32",
        "--space",
        "compile=false",
    )
    assert main(argv) == 0
    for name in ("tune.md", "tune.json", "tune.png", "best.yaml"):
        assert (out / name).is_file(), name
    report = json.loads((out / "tune.json").read_text())
    assert len(report["trials"]) == 2
    assert all(t["status"] == "ok" and t["tokens_per_sec"] > 0 for t in report["trials"])
    assert report["trials"][0]["source"] == "plan"
    fastest = max(report["trials"], key=lambda t: t["tokens_per_sec"])
    assert report["best"]["tokens_per_sec"] == fastest["tokens_per_sec"]
    assert [v["verdict"] for v in report["verify"]] == ["pass"]
    table = (out / "tune.md").read_text()
    assert table.count("| ok |") == 2 and "pred tok/s" in table
    best = Strategy.from_yaml(out / "best.yaml")
    assert best.micro_batch_size == fastest["micro_batch_size"] and best.compile is False

    key = cache.key_for_config(micro_cfg(micro_config, text_file), 1, "cpu")
    cached = cache.load_tuned(key)
    assert cached is not None and cached["strategy"] == best.to_dict() and cached["precision"] == "fp32"

    run = tmp_path / "run"
    train = micro_args(micro_config, text_file, run, "--strategy", str(out / "best.yaml"), "--max-steps", "2")
    assert main([*train, "--global-batch-size", "8", "--no-export", "--precision", "fp32"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) >= 2


def test_cache_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVERDRIVE_CACHE_DIR", str(tmp_path))
    assert cache.cache_dir() == tmp_path
    shape = {"hidden": 64, "layers": 2, "vocab": 512}
    key = cache.tune_key(shape, 64, 8, 1, "cpu")
    assert key == cache.tune_key(dict(reversed(list(shape.items()))), 64, 8, 1, "cpu")  # order-free
    others = {
        cache.tune_key(shape, 128, 8, 1, "cpu"),
        cache.tune_key(shape, 64, 16, 1, "cpu"),
        cache.tune_key(shape, 64, 8, 2, "cpu"),
        cache.tune_key(shape, 64, 8, 1, "h100"),
        cache.tune_key({**shape, "vocab": 513}, 64, 8, 1, "cpu"),
    }
    assert key not in others and len(others) == 5
    assert cache.load_tuned(key) is None
    result = {
        "strategy": Strategy(kernels=True).to_dict(),
        "precision": "bf16",
        "micro_batch_size": 2,
        "tokens_per_sec": 1.5,
    }
    path = cache.store_tuned(key, result)
    assert path.parent.parent == tmp_path
    assert cache.load_tuned(key) == {**result, "key": key}
    monkeypatch.setattr(cache, "_versions", lambda: {"overdrive": "9", "torch": "9", "transformers": "9"})
    assert cache.tune_key(shape, 64, 8, 1, "cpu") != key  # a new torch or overdrive is a new key
    path.write_text("{torn")
    assert cache.load_tuned(key) is None
    with pytest.raises(ValueError):
        cache.store_tuned(key, {"strategy": {}})


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--trials", "0"], "--trials must be a positive"),
        (["--confirm", "-1"], "--confirm must be 0 (off)"),
        (["--space", "colour=red"], "--space 'colour=red'"),
        (["--space", "kernels=maybe"], "kernels takes true or false"),
        (["--max-steps", "5"], "drop --max-steps"),
        (["--strategy", "tp"], "tensor/pipeline"),
        (["--precision", "bf16", "--space", "precision=fp32"], "leave no strategy"),
    ],
)
def test_bad_tune_input(
    extra: list[str],
    message: str,
    micro_config: Path,
    text_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "tune"
    assert message in cli_error(tune_args(micro_config, text_file, out, *extra), capsys)
    assert not out.exists()
