"""`overdrive verify`: a strategy against the fp32 eager single-process reference, per step (micro model).

A correct strategy (auto; fsdp on 2 ranks) passes at its stated tolerance; the rms_norm test hook (gradient
scaled by 1 + 1e-3 inside overdrive's kernel) fails with exit 1 at step 1; bad
input exits 2 with one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from overdrive.cli import main
from overdrive.parallel.strategy import Strategy
from overdrive.search.verify import (
    FAULT_ENV,
    StepDiff,
    Tolerance,
    compare,
    min_ranks,
    passed,
    tolerance_for,
    verdict_line,
)
from tests.conftest import cli_error, micro_args

STEPS = "5"


def verify_args(micro_config: Path, text_file: Path, out: Path, *extra: str) -> list[str]:
    """The micro run's train flags under `verify` (global batch 4 splits over 2 ranks)."""
    args = micro_args(micro_config, text_file, out, "--global-batch-size", "4", "--micro-batch-size", "2")
    return ["verify", *args[1:], "--steps", STEPS, *extra]


def report(out: Path) -> dict:
    return json.loads((out / "verify.json").read_text())


def test_perturbed_kernel_fails_at_first_step(micro_config, text_file, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv(FAULT_ENV, "rms_norm")
    out = tmp_path / "broken"
    code = main(verify_args(micro_config, text_file, out, "--strategy", "single", "--kernels"))
    stdout = capsys.readouterr().out
    assert code == 1, stdout
    verdict = stdout.strip().splitlines()[-1]
    # the forward is exact, so step 1's loss agrees; its gradient is 1e-3 off
    assert verdict.startswith("FAIL: first failing step 1 (grad-norm diff"), verdict
    result = report(out)
    assert result["verdict"] == "fail" and result["first_failing_step"] == 1
    assert result["loss_diff"][0] <= 1e-5
    assert 5e-4 < result["grad_norm_diff"][0] < 2e-3
    assert result["tolerance"] == {
        "loss": 1e-5,
        "loss_relative": True,
        "grad_norm": 1e-5,
        "grad_norm_relative": True,
        "grad_norm_median": None,
    }
    assert len(result["reference"]["loss"]) == len(result["strategy_run"]["loss"]) == 5
    # the strategy run really used the kernels, the reference really did not
    strategy_cfg = (out / "strategy.yaml").read_text()
    reference_cfg = (out / "reference.yaml").read_text()
    assert "kernels: true" in strategy_cfg and "attn_implementation: sdpa" in strategy_cfg
    assert "kernels: false" in reference_cfg and "attn_implementation: eager" in reference_cfg


@pytest.mark.distributed
def test_fsdp_on_two_ranks_matches_reference(micro_config, text_file, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv(FAULT_ENV, raising=False)
    out = tmp_path / "fsdp"
    code = main(verify_args(micro_config, text_file, out, "--strategy", "fsdp"))
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    result = report(out)
    assert result["nproc_per_node"] == 2 and result["verdict"] == "pass"
    assert "torch.distributed.run --standalone --nproc-per-node 2" in result["commands"]["strategy"]
    assert "torch.distributed.run" not in result["commands"]["reference"]


def test_auto_matches_reference(micro_config, text_file, tmp_path, capsys, monkeypatch) -> None:
    """The default strategy: whatever auto picks here (kernels, bf16, compile) passes its stated tolerance."""
    monkeypatch.delenv(FAULT_ENV, raising=False)
    out = tmp_path / "auto"
    code = main(verify_args(micro_config, text_file, out, "--strategy", "auto", "--precision", "auto"))
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    result = report(out)
    assert (
        result["verdict"] == "pass" and result["nproc_per_node"] == 1 and result["first_failing_step"] is None
    )
    assert len(result["loss_diff"]) == 5
    assert "strategy: auto" in (out / "strategy.yaml").read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--strategy", "nope"], "strategy 'nope' is neither a preset nor a YAML file"),
        (["--strategy", "fsdp", "--steps", "0"], "--steps must be a positive whole number, got 0"),
        (["--strategy", "single", "--nproc-per-node", "2"], "strategy single runs in one process"),
        (["--strategy", "fsdp", "--max-steps", "3"], "drop --max-steps"),
        (["--strategy", "fsdp", "--tolerance", "0"], "--tolerance must be a positive finite number"),
        (
            ["--strategy", "fsdp-tp", "--nproc-per-node", "3"],
            "tensor_parallel 2 must divide the world size 3",
        ),
        (["--strategy", "fsdp", "--learning-rate", "-1"], "--learning-rate must be positive"),
    ],
)
def test_bad_input_exits_2_before_running(micro_config, text_file, tmp_path, capsys, extra, message) -> None:
    out = tmp_path / "bad"
    args = verify_args(micro_config, text_file, out, *extra)
    err = cli_error(args, capsys)
    assert message in err
    assert not out.exists()


def test_non_empty_output_dir_needs_overwrite(micro_config, text_file, tmp_path, capsys) -> None:
    out = tmp_path / "used"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = cli_error(verify_args(micro_config, text_file, out, "--strategy", "single"), capsys)
    assert "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("name", "ranks"),
    [
        ("single", 1),
        ("ddp", 2),
        ("fsdp", 2),
        ("deepspeed-zero3", 2),
        ("tp", 2),
        ("pp", 2),
        ("fsdp-tp", 4),
        ("pp-fsdp", 4),
    ],
)
def test_default_ranks_follow_the_strategy_degrees(name, ranks) -> None:
    assert min_ranks(Strategy.from_name_or_path(name)) == ranks


# ------------------------------------------------------------------------------ the reduced-precision verdict

BF16_TOL = Tolerance(2e-2, False, 0.25, grad_norm_median=2e-2)


def curves(ref_norms: list[float], norms: list[float]) -> list[StepDiff]:
    """Per-step diffs of two runs with equal losses and the given grad norms."""
    reference = {i: {"loss": 5.0, "grad_norm": g} for i, g in enumerate(ref_norms, start=1)}
    run = {i: {"loss": 5.0 + 1e-3, "grad_norm": g} for i, g in enumerate(norms, start=1)}
    return compare(reference, run, len(norms), BF16_TOL)


def test_bf16_rounding_outlier_step_passes() -> None:
    """The shape of plain HF bf16 autocast vs fp32 (tiny, 20 steps): ~2e-3 off, one step 0.10 off."""
    ref = [1.5] * 20
    got = [g * (1 + 2e-3) for g in ref]
    got[14] = ref[14] * 1.10
    diffs = curves(ref, got)
    assert passed(diffs, BF16_TOL)
    assert verdict_line(diffs, BF16_TOL).startswith("PASS: all 20 steps")


def test_bf16_systematic_grad_error_fails_on_the_median() -> None:
    """A gradient 3% too large on every step stays under the per-step cap but not under the median bound."""
    ref = [1.5] * 20
    diffs = curves(ref, [g * 1.03 for g in ref])
    assert all(d.ok for d in diffs) and not passed(diffs, BF16_TOL)
    line = verdict_line(diffs, BF16_TOL)
    assert line.startswith("FAIL: the median step's grad norm is off by more than 0.02"), line
    assert "median grad-norm diff 3.00e-02" in line


def test_bf16_gross_step_fails_on_the_cap() -> None:
    ref = [1.5] * 20
    got = [g * (1 + 2e-3) for g in ref]
    got[3] = ref[3] * 1.3
    diffs = curves(ref, got)
    assert not passed(diffs, BF16_TOL)
    assert verdict_line(diffs, BF16_TOL).startswith("FAIL: first failing step 4 (grad-norm diff 3.00e-01)")


def test_tolerance_by_precision_and_override(tmp_path) -> None:
    from types import SimpleNamespace

    bf16 = SimpleNamespace(precision="bf16", dtype="float32")
    fp32 = SimpleNamespace(precision="fp32", dtype="float32")
    assert tolerance_for(bf16, None, tmp_path, None) == BF16_TOL
    assert tolerance_for(fp32, None, tmp_path, None) == Tolerance(1e-5, True, 1e-5)
    one = tolerance_for(bf16, None, tmp_path, 0.5)
    assert (one.loss, one.grad_norm, one.grad_norm_median) == (0.5, 0.5, None)
