"""`overdrive bench` with strategy columns: how each overdrive cell is planned from its strategy (processes,
tp/pp/dp, micro batch × accumulation, argv), the row it writes, and one small end-to-end run on 2 processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from overdrive.bench import plan, runner
from overdrive.bench.cli import add_bench_parser, run_bench
from overdrive.bench.inputs import Prepared
from overdrive.bench.plan import describe_cells, plan_workload
from overdrive.bench.presets import SystemSpec, Workload, parse_systems, parse_variant
from overdrive.bench.runner import check_overdrive_args
from overdrive.cli import OneLineParser, main
from overdrive.errors import UsageError

PY = sys.executable


def bench_parser() -> OneLineParser:
    parser = OneLineParser(prog="overdrive")
    add_bench_parser(parser.add_subparsers(dest="command", parser_class=OneLineParser))
    return parser


def workload(nproc: int, systems: list[SystemSpec], micro: int | None = None, sizes=(8,)) -> Workload:
    return Workload(None, "tiny", 64, sizes, steps=2, warmup_steps=1, precision="fp32", device="cpu",
                    nproc=nproc, micro_batch_size=micro, attn_implementation="sdpa",
                    systems=tuple(systems))  # fmt: skip


def fake_prepared(tmp_path: Path) -> Prepared:
    return Prepared(tmp_path / "init", tmp_path / "train.txt", tmp_path / "rows", 100, {8: tmp_path / "o.json"},
                    "test", 1, 1.0, 512)  # fmt: skip


def test_bench_plans_strategy_cells_processes_and_batches() -> None:
    """single runs on 1 process, every distributed strategy on --nproc; the batch splits over dp = nproc / tp."""
    specs = parse_systems("hf-trainer,overdrive", "cpu", 4, None, "single,fsdp,tp,fsdp-tp")
    assert [s.name for s in specs] == [
        "hf-trainer",
        "overdrive-single",
        "overdrive-fsdp",
        "overdrive-tp",
        "overdrive-fsdp-tp",
    ]
    assert specs[3].extra_args == ("--compile", "--kernels", "--strategy", "tp")
    w = plan_workload(workload(4, specs))
    cells = {c["system"]: c for c in describe_cells(w)}
    layout = {k: (c["nproc"], c["tp"], c["pp"], c["dp"], c["micro_batch_size"], c["accumulation_steps"])
              for k, c in cells.items()}  # fmt: skip
    assert layout == {
        "hf-trainer": (4, 1, 1, 4, 2, 1),
        "overdrive-single": (1, 1, 1, 1, 8, 1),
        "overdrive-fsdp": (4, 1, 1, 4, 2, 1),
        "overdrive-tp": (4, 4, 1, 1, 8, 1),
        "overdrive-fsdp-tp": (4, 2, 1, 2, 4, 1),
    }
    # a bench-wide micro batch: accumulation follows each cell's data-parallel size
    w2 = plan_workload(workload(4, specs, micro=2))
    accum = {c["system"]: c["accumulation_steps"] for c in describe_cells(w2)}
    assert accum == {
        "hf-trainer": 1,
        "overdrive-single": 4,
        "overdrive-fsdp": 1,
        "overdrive-tp": 4,
        "overdrive-fsdp-tp": 2,
    }


def test_bench_strategy_cell_commands(tmp_path: Path) -> None:
    """argv of planned cells: launcher with the cell's own process count, its micro batch, its --strategy."""
    specs = parse_systems("hf-trainer,overdrive", "cpu", 2, "", "single,tp")
    w = plan_workload(workload(2, specs))
    prep = fake_prepared(tmp_path)
    by_name = {s.name: s for s in w.systems}
    single = runner.overdrive_command(by_name["overdrive-single"], w, 8, prep, tmp_path / "c1")
    assert single[:4] == [PY, "-m", "overdrive", "train"]
    assert single[single.index("--micro-batch-size") + 1] == "8"
    assert single[-2:] == ["--strategy", "single"]
    tp = runner.overdrive_command(by_name["overdrive-tp"], w, 8, prep, tmp_path / "c2")
    assert tp[:6] == [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    assert tp[tp.index("--micro-batch-size") + 1] == "8"  # tp 2 on 2 processes: one data-parallel rank
    assert tp[-2:] == ["--strategy", "tp"]
    hf = runner.hf_command(by_name["hf-trainer"], w, 8, prep, tmp_path / "c3")
    assert hf[:6] == [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    assert json.loads((tmp_path / "c3" / "spec.json").read_text())["micro_batch_size"] == 4
    # the row written before the cell runs carries the layout
    row = plan.planned_row(by_name["overdrive-tp"], w, 8)
    assert (row["strategy"], row["nproc"], row["tp"], row["pp"], row["dp"]) == ("tp", 2, 2, 1, 1)


def test_bench_strategy_yaml_is_made_absolute_and_names_the_column(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cells run in their own directory: a relative strategy file must reach them as an absolute path."""
    monkeypatch.chdir(tmp_path)
    Path("mine.yaml").write_text("data_parallel: fsdp\n")
    specs = parse_systems("overdrive", "cpu", 2, "--kernels", "mine.yaml")
    w = plan_workload(workload(2, specs))
    (spec,) = w.systems
    assert spec.name == "overdrive-mine" and spec.nproc == 2
    assert spec.extra_args == ("--kernels", "--strategy", str(tmp_path.resolve() / "mine.yaml"))
    # the same through a variant's `--strategy=FILE` form
    (v,) = plan_workload(workload(2, [parse_variant("m=--strategy=mine.yaml")])).systems
    assert v.extra_args == (f"--strategy={tmp_path.resolve() / 'mine.yaml'}",) and v.nproc == 2


class PipelineStrategy:
    """A strategy from the future: a pipeline axis, no tp_degree method (read through getattr)."""

    is_distributed = True
    pipeline_parallel = 2

    def validate(self, world_size: int) -> None:
        pass

    def resolve_batch(self, g: int, dp: int, micro: int | None) -> tuple[int, int]:
        micro = micro or g // dp
        return micro, g // (micro * dp)


def test_bench_reads_tp_and_pp_through_getattr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan, "load_strategy", lambda name: PipelineStrategy())
    w = plan_workload(workload(4, [SystemSpec("overdrive-pp", "overdrive", ("--strategy", "pp"))], micro=1))
    (cell,) = describe_cells(w)
    assert (cell["nproc"], cell["tp"], cell["pp"], cell["dp"]) == (4, 1, 2, 2)
    assert (cell["micro_batch_size"], cell["accumulation_steps"]) == (1, 4)


def test_bench_strategy_input_errors() -> None:
    with pytest.raises(UsageError, match="overdrive-fsdp-tp with --nproc 1: strategy: tensor_parallel 2"):
        plan_workload(workload(1, parse_systems("overdrive", "cpu", 1, None, "fsdp-tp")))
    with pytest.raises(UsageError, match="neither a preset nor a YAML file"):
        plan_workload(workload(2, parse_systems("overdrive", "cpu", 2, None, "nope")))
    with pytest.raises(UsageError, match="drop one"):
        parse_systems("overdrive", "cpu", 2, "--strategy ddp", "fsdp")
    with pytest.raises(UsageError, match="fixed by the workload"):  # it would change the global batch
        check_overdrive_args(SystemSpec("overdrive", "overdrive", ("--gradient-accumulation-steps", "2")))
    with pytest.raises(UsageError, match="needs overdrive in --systems"):
        parse_systems("hf-trainer", "cpu", 2, None, "fsdp")
    # a batch that does not split over the strategy's ranks: that cell is skipped, the others run
    w = plan_workload(workload(4, parse_systems("overdrive", "cpu", 4, None, "fsdp"), sizes=(8, 6)))
    status = {c["global_batch_size"]: (c["status"], c.get("message", "")) for c in describe_cells(w)}
    assert status[8] == ("planned", "")
    assert status[6][0] == "skipped" and "overdrive-fsdp at global batch 6 (4 data-parallel" in status[6][1]
    with pytest.raises(UsageError, match="overdrive-fsdp at global batch 6 .4 data-parallel"):  # nothing runs
        plan_workload(workload(4, parse_systems("overdrive", "cpu", 4, None, "fsdp"), sizes=(6,)))
    parser = bench_parser()
    argv = ["bench", "--systems", "overdrive", "--overdrive-strategies", "fsdp,fsdp", "--dry-run"]
    with pytest.raises(UsageError, match="two columns are named overdrive-fsdp"):
        run_bench(parser.parse_args(argv))


def test_bench_cell_row_counts_per_device_by_the_cells_own_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tp cell on 2 processes: tokens/s/device divides by 2, sec/iter is per measured step, and the micro
    batch and accumulation the run reports (summary.json) are what the row keeps."""
    w = plan_workload(workload(2, parse_systems("overdrive", "cpu", 2, "", "tp")))
    (spec,) = w.systems

    def fake_run(argv, timeout, log_dir, env=None):
        run = log_dir / "run"
        run.mkdir(parents=True)
        steps = [{"step": i + 1, "loss": 5.0 - i, "elapsed_sec": 1.0 + 2.0 * i, "peak_memory_bytes": 7}
                 for i in range(3)]  # fmt: skip
        (run / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
        (run / "summary.json").write_text(
            json.dumps({"micro_batch_size": 4, "gradient_accumulation_steps": 2})
        )
        return runner.ProcessOutcome("ok", 0, 5.0)

    monkeypatch.setattr(runner, "run_process", fake_run)
    row = runner.run_cell(spec, w, 8, fake_prepared(tmp_path), tmp_path / "cells", None)
    # 2 measured steps × 8 rows × 64 tokens in 4 s (end of step 1 at 1 s to end of step 3 at 5 s)
    assert row["tokens_per_sec"] == pytest.approx(256.0)
    assert row["tokens_per_sec_per_device"] == pytest.approx(128.0)
    assert row["sec_per_iter"] == pytest.approx(2.0)
    assert (row["micro_batch_size"], row["accumulation_steps"], row["tp"], row["nproc"]) == (4, 2, 2, 2)
    assert row["peak_memory_bytes"] == 7 and row["first_losses"] == [5.0, 4.0, 3.0]
    # a single-process column in the same --nproc 2 bench is one device: no division by 2
    (single,) = plan_workload(workload(2, parse_systems("overdrive", "cpu", 2, "", "single"))).systems
    row = runner.run_cell(single, w, 8, fake_prepared(tmp_path), tmp_path / "cells1", None)
    assert row["nproc"] == 1 and row["tokens_per_sec_per_device"] == pytest.approx(256.0)
    assert "torch.distributed.run" not in row["command"]


@pytest.mark.slow
def test_bench_strategy_cells_end_to_end(micro_config: Path, text_file: Path, tmp_path: Path) -> None:
    """`--overdrive-strategies single,fsdp --nproc 2`: single on 1 process, fsdp on 2 (torchrun), both train
    the same thing (fp32 losses within 1e-5) and the seed-shaped table shows each cell's layout."""
    out = tmp_path / "bench"
    argv = ["bench", "--model-config", str(micro_config), "--train-file", str(text_file), "--vocab-size", "512",
            "--seq-len", "64", "--batch-sizes", "8", "--steps", "2", "--warmup-steps", "1", "--precision", "fp32",
            "--systems", "overdrive", "--overdrive-strategies", "single,fsdp", "--overdrive-args", "",
            "--nproc", "2", "--timeout", "240", "--output-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = {r["system"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}
    single, fsdp = rows["overdrive-single"], rows["overdrive-fsdp"]
    for r in (single, fsdp):
        assert r["status"] == "ok", r["message"]
    assert (single["nproc"], single["micro_batch_size"], fsdp["nproc"], fsdp["micro_batch_size"]) == (
        1,
        8,
        2,
        4,
    )
    assert fsdp["world_size"] == 2 and "--nproc-per-node 2" in fsdp["command"]
    assert "torch.distributed.run" not in single["command"]
    for a, b in zip(single["first_losses"], fsdp["first_losses"], strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    md = (out / "bench.md").read_text()
    assert "| overdrive-fsdp | 1 | 1 | 4 | 1 | 8 | 64 | 2 | - |" in md
