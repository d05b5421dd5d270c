"""`overdrive bench` with pipeline columns (pp, pp-fsdp, a YAML schedule): the cell plan picks a micro batch
that fills the pipeline, tp/pp come from the strategy for the cell's processes, the bubble column carries the
schedule's model value, and a cell that cannot run is reported skipped with its reason instead of running."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from overdrive.bench import report, runner
from overdrive.bench.inputs import Prepared
from overdrive.bench.plan import describe_cells, plan_workload
from overdrive.bench.presets import SystemSpec, Workload, parse_systems
from overdrive.cli import main
from overdrive.errors import UsageError
from tests.conftest import cli_error

PY = sys.executable


def workload(nproc: int, systems: list[SystemSpec], micro: int | None = None, sizes=(8,)) -> Workload:
    return Workload(None, "tiny", 64, sizes, steps=2, warmup_steps=1, precision="fp32", device="cpu",
                    nproc=nproc, micro_batch_size=micro, attn_implementation="sdpa",
                    systems=tuple(systems))  # fmt: skip


def cells(w: Workload) -> dict[tuple[str, int], dict]:
    return {(c["system"], c["global_batch_size"]): c for c in describe_cells(w)}


def fake_prepared(tmp_path: Path) -> Prepared:
    return Prepared(tmp_path / "init", tmp_path / "train.txt", tmp_path / "rows", 100, {8: tmp_path / "o.json"},
                    "test", 1, 1.0, 512)  # fmt: skip


def test_bench_plans_pipeline_cells_with_enough_micro_batches(tmp_path: Path) -> None:
    """pp on 2 processes is pp 2 over 1 data-parallel rank: the default micro batch (global / dp = 8) would give
    1 micro-batch, which cannot fill 2 stages, so the plan takes the largest micro batch that gives 2."""
    w = plan_workload(workload(2, parse_systems("hf-trainer,overdrive", "cpu", 2, "", "pp,pp-fsdp")))
    c = cells(w)
    layout = {k[0]: (v["nproc"], v["tp"], v["pp"], v["dp"], v["micro_batch_size"], v["accumulation_steps"])
              for k, v in c.items()}  # fmt: skip
    assert layout == {
        "hf-trainer": (2, 1, 1, 2, 4, 1),
        "overdrive-pp": (2, 1, 2, 1, 4, 2),
        "overdrive-pp-fsdp": (2, 1, 2, 1, 4, 2),
    }
    pp = c[("overdrive-pp", 8)]
    assert (pp["status"], pp["pipeline_schedule"]) == ("planned", "1f1b")
    assert pp["pipeline_bubble"] == pytest.approx(1 / 3)  # (P-1) / (M + P-1) = 1 / (2 + 1)
    # --dry-run shows the pipeline keys for pipeline cells only
    assert "pipeline_bubble" not in c[("hf-trainer", 8)]
    # what the cell launches: torchrun on its 2 processes with that micro batch
    spec = next(s for s in w.systems if s.name == "overdrive-pp")
    argv = runner.overdrive_command(spec, w, 8, fake_prepared(tmp_path), tmp_path / "cell")
    assert argv[:6] == [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    assert argv[argv.index("--micro-batch-size") + 1] == "4" and argv[-2:] == ["--strategy", "pp"]


def test_bench_pipeline_degrees_follow_the_processes() -> None:
    """pp takes all 4 processes as stages; pp-fsdp keeps pp 2 and shards over the other 2."""
    w = plan_workload(workload(4, parse_systems("overdrive", "cpu", 4, "", "pp,pp-fsdp"), sizes=(8, 16)))
    c = cells(w)
    assert [c[("overdrive-pp", g)][k] for g in (8, 16) for k in ("pp", "dp", "micro_batch_size")] == [
        4, 1, 2, 4, 1, 4,
    ]  # fmt: skip
    fsdp = c[("overdrive-pp-fsdp", 8)]
    assert (fsdp["tp"], fsdp["pp"], fsdp["dp"], fsdp["micro_batch_size"], fsdp["accumulation_steps"]) == (
        1, 2, 2, 2, 2,
    )  # fmt: skip
    assert c[("overdrive-pp", 8)]["pipeline_bubble"] == pytest.approx(3 / 7)  # 3 / (4 + 3)
    # a bench-wide micro batch is kept: more micro-batches per step, a smaller bubble
    c1 = cells(plan_workload(workload(2, parse_systems("overdrive", "cpu", 2, "", "pp"), micro=1)))
    pp = c1[("overdrive-pp", 8)]
    assert (pp["micro_batch_size"], pp["accumulation_steps"]) == (1, 8)
    assert pp["pipeline_bubble"] == pytest.approx(1 / 9)


def test_bench_interleaved_schedule_bubble_from_a_yaml(tmp_path: Path) -> None:
    """Interleaved 1F1B with 2 virtual stages per rank: the ramp is (P-1)/V, so 0.5 / (2 + 0.5)."""
    yaml = tmp_path / "inter.yaml"
    yaml.write_text("data_parallel: none\npipeline_parallel: 2\npipeline_schedule: interleaved-1f1b\n"
                    "virtual_stages: 2\n")  # fmt: skip
    w = plan_workload(workload(2, parse_systems("overdrive", "cpu", 2, "", str(yaml))))
    (c,) = describe_cells(w)
    assert (c["system"], c["pp"], c["micro_batch_size"], c["accumulation_steps"]) == (
        "overdrive-inter",
        2,
        4,
        2,
    )
    assert (c["pipeline_schedule"], c["pipeline_bubble"]) == ("interleaved-1f1b", pytest.approx(0.2))


def test_bench_pipeline_cells_that_cannot_run_are_skipped_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = plan_workload(workload(1, parse_systems("hf-trainer,overdrive", "cpu", 1, "", "pp,pp-fsdp")))
    c = cells(w)
    assert c[("hf-trainer", 8)]["status"] == "planned"
    assert c[("overdrive-pp", 8)]["status"] == "skipped"
    assert "a pipeline needs at least 2 stages but --nproc 1 gives 1" in c[("overdrive-pp", 8)]["message"]
    fsdp = c[("overdrive-pp-fsdp", 8)]
    assert fsdp["status"] == "skipped" and (fsdp["micro_batch_size"], fsdp["pp"]) == (None, 2)
    assert "pipeline 2 × tensor 1 = 2 must divide the world size 1" in fsdp["message"]
    # pp-fsdp on 3 processes: 2 stages do not divide them
    c3 = cells(
        plan_workload(workload(3, parse_systems("overdrive", "cpu", 3, "", "single,pp-fsdp"), sizes=(6,)))
    )
    assert c3[("overdrive-single", 6)]["status"] == "planned"
    assert "must divide the world size 3" in c3[("overdrive-pp-fsdp", 6)]["message"]
    # too few rows for 2 micro-batches: that batch size is skipped, the next one runs
    c2 = cells(plan_workload(workload(2, parse_systems("overdrive", "cpu", 2, "", "pp"), sizes=(1, 8))))
    assert c2[("overdrive-pp", 1)]["status"] == "skipped"
    assert "needs at least 2 micro-batches per step" in c2[("overdrive-pp", 1)]["message"]
    assert c2[("overdrive-pp", 8)]["status"] == "planned"

    # a skipped cell launches nothing; its row and the seed table say why
    def no_run(*args, **kwargs):
        raise AssertionError("a skipped cell must not start a process")

    monkeypatch.setattr(runner, "run_process", no_run)
    spec = next(s for s in w.systems if s.name == "overdrive-pp")
    row = runner.run_cell(spec, w, 8, fake_prepared(tmp_path), tmp_path / "cells", None)
    assert row["status"] == "skipped" and "pass --nproc 2 or more" in row["message"]
    assert not (tmp_path / "cells").exists()
    assert report.cell_summary(row).startswith("skipped: overdrive-pp with --nproc 1")
    line = next(ln for ln in report.seed_table([row], w.to_dict()) if ln.startswith("| overdrive-pp"))
    assert line.endswith("| skipped |")


def test_bench_pipeline_bench_where_nothing_can_run_is_an_input_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(
        UsageError, match="8 pipeline stages need at least 8 decoder layers but the model has 4"
    ):
        plan_workload(workload(8, parse_systems("overdrive", "cpu", 8, "", "pp")))
    err = cli_error(["bench", "--systems", "overdrive", "--overdrive-strategies", "pp", "--nproc", "1",
                     "--dry-run"], capsys)  # fmt: skip
    assert "overdrive-pp with --nproc 1: a pipeline needs at least 2 stages" in err


def test_bench_pipeline_row_and_seed_table_carry_the_bubble(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row keeps the micro-batches per step the run reported (summary.json) and its bubble follows them; the
    seed table shows the bubble as the schedule's model value, `-` for cells without a pipeline."""
    w = plan_workload(workload(2, parse_systems("overdrive", "cpu", 2, "", "pp,single")))

    def fake_run(argv, timeout, log_dir, env=None):
        run = log_dir / "run"
        run.mkdir(parents=True)
        steps = [{"step": i + 1, "loss": 5.0 - i, "elapsed_sec": 1.0 + i, "peak_memory_bytes": 2**30}
                 for i in range(3)]  # fmt: skip
        (run / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
        (run / "summary.json").write_text(
            json.dumps({"micro_batch_size": 2, "gradient_accumulation_steps": 4})
        )
        return runner.ProcessOutcome("ok", 0, 5.0)

    monkeypatch.setattr(runner, "run_process", fake_run)
    rows = [runner.run_cell(s, w, 8, fake_prepared(tmp_path), tmp_path / "cells", None) for s in w.systems]
    pp, single = rows
    assert (pp["micro_batch_size"], pp["accumulation_steps"], pp["pp"]) == (2, 4, 2)
    assert pp["pipeline_bubble"] == pytest.approx(1 / 5) and single["pipeline_bubble"] is None
    table = "\n".join(report.seed_table(rows, w.to_dict()))
    assert "pipeline bubble (schedule model)" in table and "a model value, not a measurement" in table
    assert "| overdrive-pp | 1 | 2 | 2 | 4 | 8 | 64 | 2 | 0.200 (1f1b) | 1.00 | 1.000 | 256.0 |" in table
    assert "| overdrive-single | 1 | 1 | 2 | 4 | 8 | 64 | 1 | - | 1.00 | 1.000 | 512.0 |" in table
    assert report.fmt_bubble({"pipeline_bubble": 0.2, "pipeline_schedule": "interleaved-1f1b",
                              "virtual_stages": 2}) == "0.200 (interleaved-1f1b, V=2)"  # fmt: skip


@pytest.mark.slow
def test_bench_pipeline_cell_end_to_end(micro_config: Path, text_file: Path, tmp_path: Path) -> None:
    """`--overdrive-strategies single,pp --nproc 2`: pp runs 2 stages on 2 processes with 2 micro-batches and
    trains the same thing as the single process (fp32 losses within 1e-5); the table shows pp 2 and the bubble."""
    out = tmp_path / "bench"
    argv = ["bench", "--model-config", str(micro_config), "--train-file", str(text_file), "--vocab-size", "512",
            "--seq-len", "64", "--batch-sizes", "8", "--steps", "2", "--warmup-steps", "1", "--precision", "fp32",
            "--systems", "overdrive", "--overdrive-strategies", "single,pp", "--overdrive-args", "",
            "--nproc", "2", "--timeout", "240", "--output-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = {r["system"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}
    single, pp = rows["overdrive-single"], rows["overdrive-pp"]
    for r in (single, pp):
        assert r["status"] == "ok", r["message"]
    assert (pp["nproc"], pp["pp"], pp["micro_batch_size"], pp["accumulation_steps"]) == (2, 2, 4, 2)
    assert pp["pipeline_bubble"] == pytest.approx(1 / 3) and "--nproc-per-node 2" in pp["command"]
    for a, b in zip(single["first_losses"], pp["first_losses"], strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    md = (out / "bench.md").read_text()
    assert "| overdrive-pp | 1 | 2 | 4 | 2 | 8 | 64 | 2 | 0.333 (1f1b) |" in md
