"""--report-to: names, missing libraries, and what each real tracker library ends up holding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from overdrive import tracking
from overdrive.errors import UsageError
from overdrive.tracking import Tracker, check_available, open_trackers, parse_report_to, to_scalars

# Lines shaped like metrics.jsonl: a first eval, train records (throughput unknown at first), a mid-run eval.
RECORDS: list[dict[str, Any]] = [
    {"step": 0, "eval_loss": 6.2381, "eval_perplexity": 511.9},
    {
        "step": 1,
        "epoch": 0.05,
        "loss": 6.2417,
        "lr": 1.5e-4,
        "grad_norm": 2.71,
        "tokens_per_sec": None,
        "tokens_per_sec_per_device": None,
        "tflops_per_device": None,
        "mfu": None,
        "peak_memory_bytes": 412_000_000,
        "elapsed_sec": 0.81,
    },
    *[
        {
            "step": s,
            "epoch": s / 20,
            "loss": 6.3 - 0.37 * s,
            "lr": 3e-4 * (1 - s / 10),
            "grad_norm": 1.0 / s,
            "tokens_per_sec": 1000.0 + s,
            "tokens_per_sec_per_device": 1000.0 + s,
            "tflops_per_device": 0.01,
            "mfu": None,
            "peak_memory_bytes": 413_000_000,
            "elapsed_sec": 0.8 * s,
        }
        for s in (2, 4, 6)
    ],
    {"step": 6, "eval_loss": 4.1234, "eval_perplexity": 61.76},
]
CONFIG = {"learning_rate": 3e-4, "block_size": 64, "output_dir": Path("runs/x"), "strategy": {"name": "ddp"}}
TRAIN = [r for r in RECORDS if "loss" in r]
EVALS = [r for r in RECORDS if "eval_loss" in r]


# --- names ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, []),
        ("none", []),
        ("tensorboard", ["tensorboard"]),
        ("tensorboard, wandb", ["tensorboard", "wandb"]),
        ("MLflow,trackio,mlflow", ["mlflow", "trackio"]),
        (["wandb"], ["wandb"]),  # a YAML list
        ([], []),
    ],
)
def test_parse_report_to(value: Any, expected: list[str]) -> None:
    assert parse_report_to(value) == expected


@pytest.mark.parametrize("value", ["bogus", "tensorboard,tensorbord", "all", "none,wandb", "", " , "])
def test_parse_report_to_rejects_with_one_line_naming_the_choices(value: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_report_to(value)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("--report-to")
    assert "none or a comma list of tensorboard, wandb, trackio, mlflow" in message


def test_missing_library_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec answers None: as if not installed
    with pytest.raises(UsageError) as err:
        check_available(["wandb"])
    assert str(err.value) == "--report-to wandb needs the wandb package; pip install 'overdrive[wandb]'"
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(UsageError) as err:
        check_available(["wandb", "mlflow"])
    assert str(err.value) == (
        "--report-to wandb,mlflow needs the wandb and mlflow packages; pip install 'overdrive[wandb,mlflow]'"
    )


def test_missing_tensorboard_fails_before_anything_is_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UsageError, match=r"pip install 'overdrive\[tensorboard\]'"):
        open_trackers(["tensorboard"], tmp_path, CONFIG, "run")
    assert list(tmp_path.iterdir()) == []


def test_records_map_to_train_and_eval_scalars() -> None:
    record = {
        "step": 3,
        "loss": 2.5,
        "lr": 1e-3,
        "mfu": None,
        "note": "x",
        "flag": True,
        "peak_memory_bytes": 7,
    }
    assert to_scalars(record) == {"train/loss": 2.5, "train/lr": 1e-3, "train/peak_memory_bytes": 7.0}
    assert to_scalars(EVALS[0]) == {"eval/loss": 6.2381, "eval/perplexity": 511.9}


# --- the fan-out ---------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self, name: str = "recorder", fail: bool = False) -> None:
        self.name, self.fail = name, fail
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.closed: list[bool] = []

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if self.fail:
            raise ConnectionError("server went away\nsecond line")
        self.logged.append((step, scalars))

    def close(self, ok: bool) -> None:
        self.closed.append(ok)


def test_failing_tracker_warns_once_and_the_others_go_on() -> None:
    good, bad = Recorder(), Recorder("wandb", fail=True)
    tracker = Tracker([bad, good])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for record in RECORDS:
            tracker.log(record["step"], record)
        tracker.close()
        tracker.close()  # twice is harmless
    messages = [str(w.message) for w in caught]
    assert messages[0].startswith(
        "overdrive: --report-to wandb failed to log step 0 (ConnectionError: server went away)"
    )
    assert "\n" not in messages[0]
    assert messages[1:] == [f"overdrive: --report-to wandb failed {len(RECORDS)} times in this run"]
    assert [step for step, _ in good.logged] == [r["step"] for r in RECORDS]
    assert good.closed == [True] and bad.closed == [True]


def test_tracker_that_cannot_start_is_one_line_and_the_started_ones_are_closed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    started = Recorder("tensorboard")

    def fake_open(name: str, *args: Any) -> Recorder:
        if name == "wandb":
            raise RuntimeError("api key not configured (no-tty)\ncall wandb.login()")
        return started

    monkeypatch.setattr(tracking, "check_available", lambda names: None)
    monkeypatch.setattr(tracking, "_open_one", fake_open)
    with pytest.raises(UsageError) as err:
        open_trackers(["tensorboard", "wandb"], tmp_path, CONFIG, "run")
    assert str(err.value) == (
        "--report-to wandb could not start (RuntimeError: api key not configured (no-tty)); "
        "fix it or leave wandb out"
    )
    assert started.closed == [False]


def test_no_trackers_does_nothing(tmp_path: Path) -> None:
    with open_trackers([], tmp_path, CONFIG, "run") as tracker:
        tracker.log(1, TRAIN[0])
    assert tracker.names == [] and list(tmp_path.iterdir()) == []


# --- TensorBoard (a dev dependency, so CI runs these) ---------------------------------------------------------


def _has(module: str) -> bool:
    return tracking._installed(module)


def _accumulator(log_dir: Path) -> Any:
    pytest.importorskip(
        "tensorboard", reason="tensorboard is not installed: pip install 'overdrive[tensorboard]'"
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return acc


def _f32(values: list[float]) -> list[float]:
    """TensorBoard keeps scalars as float32."""
    return [float(np.float32(v)) for v in values]


def _log_all(names: list[str], out: Path, records: list[dict[str, Any]], **kwargs: Any) -> None:
    with open_trackers(names, out, CONFIG, "run", **kwargs) as tracker:
        for record in records:
            tracker.log(record["step"], record)


@pytest.mark.skipif(
    not _has("tensorboard"), reason="tensorboard is not installed: pip install 'overdrive[tensorboard]'"
)
def test_tensorboard_event_files_hold_the_logged_scalars_and_config(tmp_path: Path) -> None:
    _log_all(["tensorboard"], tmp_path, RECORDS)
    acc = _accumulator(tmp_path / "tensorboard")
    scalars = acc.Tags()["scalars"]

    def series(tag: str) -> tuple[list[int], list[float]]:
        events = acc.Scalars(tag)
        return [e.step for e in events], [e.value for e in events]

    assert series("train/loss") == ([r["step"] for r in TRAIN], _f32([r["loss"] for r in TRAIN]))
    assert series("train/lr") == ([r["step"] for r in TRAIN], _f32([r["lr"] for r in TRAIN]))
    assert series("eval/loss") == ([0, 6], _f32([r["eval_loss"] for r in EVALS]))
    assert series("eval/perplexity") == ([0, 6], _f32([r["eval_perplexity"] for r in EVALS]))
    # None is skipped: throughput starts at step 2, mfu never appears; the step key is not a scalar
    assert series("train/tokens_per_sec")[0] == [2, 4, 6]
    assert "train/mfu" not in scalars and "train/step" not in scalars
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "learning_rate: 0.0003" in text and "output_dir: runs/x" in text
    from tensorboard.plugins.hparams import plugin_data_pb2

    raw = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(raw).session_start_info.hparams
    assert hparams["block_size"].number_value == 64 and hparams["strategy.name"].string_value == "ddp"


@pytest.mark.skipif(
    not _has("tensorboard"), reason="tensorboard is not installed: pip install 'overdrive[tensorboard]'"
)
def test_tensorboard_resume_replaces_the_steps_after_the_checkpoint(tmp_path: Path) -> None:
    _log_all(["tensorboard"], tmp_path, TRAIN)  # killed after step 6
    resumed = [{"step": s, "loss": 10.0 + s} for s in (5, 6, 7)]
    _log_all(["tensorboard"], tmp_path, resumed, resume_step=4)  # resumed from the step-4 checkpoint
    events = _accumulator(tmp_path / "tensorboard").Scalars("train/loss")
    assert [(e.step, e.value) for e in events] == [
        *[(r["step"], float(np.float32(r["loss"]))) for r in TRAIN[:3]],  # steps 1, 2, 4
        (5, 15.0),
        (6, 16.0),
        (7, 17.0),
    ]


# --- W&B, MLflow, trackio: only where installed (not in the dev extra: heavy) ---------------------------------

WRITER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from overdrive.tracking import open_trackers
    out, name, records, config = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    with open_trackers([name], out, config, "test-run") as tracker:
        for record in records:
            tracker.log(record["step"], record)
    """
)


def _run_writer(name: str, out: Path, env: dict[str, str | None], extra: str = "") -> str:
    """Each library in a fresh process: they keep global state (services, import-time settings).

    `env` overrides the environment; None removes a variable.
    """
    config = {k: str(v) if isinstance(v, Path) else v for k, v in CONFIG.items()}
    merged = {**os.environ, **env}
    result = subprocess.run(
        [sys.executable, "-c", WRITER + extra, str(out), name, json.dumps(RECORDS), json.dumps(config)],
        env={k: v for k, v in merged.items() if v is not None},
        cwd=out.parent,  # anything a library drops into the working directory shows up next to the run
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _wandb_history(run_file: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """History rows and config of an offline run, read from its .wandb file (LevelDB-style log of protobufs)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk, rows, config = 7, 32768, b"", [], {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record.FromString(chunk)
            chunk = b""
            if record.HasField("history"):
                rows.append(
                    {
                        item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item
                    }
                )
            if record.HasField("run"):
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    return rows, config


def test_wandb_offline_run_holds_the_logged_history(tmp_path: Path) -> None:
    pytest.importorskip("wandb", reason="wandb is not installed: pip install 'overdrive[wandb]'")
    env: dict[str, str | None] = {
        "WANDB_MODE": None,  # overdrive's default: offline
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "cfg"),
    }
    env |= {"WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_DATA_DIR": str(tmp_path / "data")}
    env |= {"WANDB_DIR": None, "WANDB_PROJECT": None}
    out = tmp_path / "run"
    _run_writer("wandb", out, env)
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    rows, config = _wandb_history(run_file)
    by_step = {row["_step"]: row for row in rows}
    assert [by_step[r["step"]]["train/loss"] for r in TRAIN] == [r["loss"] for r in TRAIN]
    assert [by_step[r["step"]]["eval/loss"] for r in EVALS] == [r["eval_loss"] for r in EVALS]
    assert "train/mfu" not in by_step[2] and "train/step" not in by_step[2]
    assert config["learning_rate"] == 3e-4 and config["strategy"] == {"name": "ddp"}
    assert config["output_dir"] == "runs/x"


def test_mlflow_local_store_holds_the_logged_metrics_and_config(tmp_path: Path) -> None:
    pytest.importorskip("mlflow", reason="mlflow is not installed: pip install 'overdrive[mlflow]'")
    from mlflow import MlflowClient

    out = tmp_path / "run"
    _run_writer("mlflow", out, {"MLFLOW_TRACKING_URI": None, "MLFLOW_EXPERIMENT_NAME": None})
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("overdrive").experiment_id])
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], r["loss"]) for r in TRAIN]
    evals = client.get_metric_history(run.info.run_id, "eval/perplexity")
    assert [(m.step, m.value) for m in evals] == [(r["step"], r["eval_perplexity"]) for r in EVALS]
    assert run.info.status == "FINISHED" and run.info.run_name == "test-run"
    assert run.data.params["learning_rate"] == "0.0003" and run.data.params["strategy.name"] == "ddp"
    assert "train/mfu" not in run.data.metrics
    assert list((out / "mlruns" / "artifacts").glob("*/artifacts/config.yaml"))
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # nothing outside the output dir


READ_TRACKIO = textwrap.dedent(
    """
    from trackio.sqlite_storage import SQLiteStorage
    print(json.dumps(SQLiteStorage.get_logs("overdrive", "test-run")))
    """
)


def test_trackio_local_store_holds_the_logged_metrics(tmp_path: Path) -> None:
    pytest.importorskip("trackio", reason="trackio is not installed: pip install 'overdrive[trackio]'")
    env: dict[str, str | None] = {
        "TRACKIO_DIR": str(tmp_path / "trackio"),
        "TRACKIO_SPACE_ID": None,
        "HF_HUB_OFFLINE": "1",
    }
    stdout = _run_writer("trackio", tmp_path / "run", env, READ_TRACKIO)
    logs = json.loads(stdout.strip().splitlines()[-1])
    train = [(row["step"], row["train/loss"]) for row in logs if "train/loss" in row]
    assert train == [(r["step"], r["loss"]) for r in TRAIN]
    assert [(row["step"], row["eval/loss"]) for row in logs if "eval/loss" in row] == [
        (0, 6.2381),
        (6, 4.1234),
    ]
    assert not any("train/mfu" in row for row in logs)
