"""`overdrive train --strategy pp` on 2 ranks gives the single-process losses at every step, evaluates through
the stages, and its checkpoint exports to an HF model with the single-process model's logits. Bad pipeline
settings fail with one line before any process group starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from overdrive.cli import main
from overdrive.metrics import read_metrics
from tests.conftest import cli_error, micro_args
from tests.train.test_tensor_parallel_e2e import COMMON, torchrun

TOL = 1e-5  # fp32: the stages change only where sums are split (observed ≤ 1e-6)
PP_COMMON = [*COMMON[:-4], "--micro-batch-size", "2", "--logging-steps", "1", "--max-new-tokens", "3"]


def records(run: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run / "metrics.jsonl") if key in r}


@pytest.fixture(scope="module")
def runs(micro_config, text_file, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pp")
    single, pp = root / "single", root / "pp"
    args = [*PP_COMMON, "--max-steps", "6", "--save-steps", "3", "--eval-steps", "3"]
    assert main(micro_args(micro_config, text_file, single, *args, "--strategy", "single")) == 0  # not auto
    torchrun(2, micro_args(micro_config, text_file, pp, *args, "--strategy", "pp"))
    return single, pp


def test_pipeline_run_matches_one_process(runs: tuple[Path, Path]) -> None:
    single, pp = runs
    for key in ("loss", "eval_loss", "grad_norm"):
        expected, got = records(single, key), records(pp, key)
        assert sorted(got) == sorted(expected) and got, key
        for step, value in got.items():
            assert abs(value - expected[step]) <= TOL * abs(expected[step]), (
                key,
                step,
                value,
                expected[step],
            )


def test_pipeline_checkpoint_exports_the_same_model(runs: tuple[Path, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    single, pp = runs
    assert main(["export", str(pp / "checkpoints" / "step-0000006"), str(tmp_path / "hf")]) == 0
    ids = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    expected = AutoModelForCausalLM.from_pretrained(single / "final").eval()
    for exported in (tmp_path / "hf", pp / "final"):  # `overdrive export`, and the run's own closing export
        model = AutoModelForCausalLM.from_pretrained(exported).eval()
        with torch.no_grad():
            diff = (model(ids).logits - expected(ids).logits).abs().max().item()
        assert diff <= TOL, (exported, diff)
    assert (pp / "sample.txt").read_text().strip(), "the closing sample ran from the exported model"


@pytest.mark.parametrize(
    ("strategy_yaml", "extra", "message"),
    [
        (
            "pipeline_parallel: 2\nvirtual_stages: 2\npipeline_schedule: interleaved-1f1b\n",
            ["--micro-batch-size", "2"],
            "4 pipeline stages need at least 4 decoder layers but the model has 2",
        ),
        (
            "pipeline_parallel: 2\n",
            ["--micro-batch-size", "8"],
            "needs at least 2 micro-batches per step but the global batch gives 1",
        ),
        (
            "pipeline_parallel: 2\nengine: deepspeed\ndata_parallel: ddp\n",
            ["--micro-batch-size", "2"],
            "pipeline_parallel works with engine torch",
        ),
    ],
    ids=["more-stages-than-layers", "too-few-micro-batches", "deepspeed"],
)
def test_bad_pipeline_settings_fail_before_the_process_group(
    strategy_yaml, extra, message, micro_config, text_file, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)  # a process group could not even start
    yaml = tmp_path / "pp.yaml"
    yaml.write_text(strategy_yaml)
    out = tmp_path / "run"
    args = micro_args(
        micro_config, text_file, out, "--global-batch-size", "8", "--strategy", str(yaml), *extra
    )
    err = cli_error(args, capsys)
    assert message in err
    assert not out.exists()
