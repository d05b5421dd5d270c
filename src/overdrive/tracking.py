"""Experiment tracking: `--report-to none|tensorboard|wandb|trackio|mlflow` (a comma list, default none).

Each tracker is the real library, installed as an optional extra (`pip install 'overdrive[tensorboard]'`), and
receives the same scalars as metrics.jsonl plus the resolved config. Names are checked, and the libraries looked
up, while the config is validated, so a missing one ends the run with one line before anything is written.
Once the run is going, a tracker that fails to log warns once and the run goes on: metrics.jsonl stays the
record of truth.

Intended use (rank 0 only; other ranks get the no-op tracker that `open_trackers([], ...)` returns):

    names = parse_report_to(cfg.report_to)      # config validation: bad names -> UsageError
    check_available(names)                      # missing library -> UsageError naming the extra
    ...
    tracker = open_trackers(names if runtime.is_main else [], output_dir, cfg.to_dict(), output_dir.name,
                            resume_step=start_step if resume_from else None)
    try:
        for record in records:                  # every record written to metrics.jsonl
            writer.write(record)
            tracker.log(record["step"], record)
    finally:
        tracker.close(ok=...)

Record keys map to tracker names as `loss` -> `train/loss`, `lr` -> `train/lr`, `eval_loss` -> `eval/loss`,
`eval_perplexity` -> `eval/perplexity`; `step`, None and non-numbers are not sent. Where each tracker writes:
TensorBoard `OUTPUT/tensorboard/`; W&B `OUTPUT/wandb/` in offline mode unless WANDB_MODE / WANDB_DIR /
WANDB_PROJECT say otherwise; MLflow a SQLite store `OUTPUT/mlruns/mlflow.db` unless MLFLOW_TRACKING_URI is set
(MLFLOW_EXPERIMENT_NAME honoured); trackio its own local store (TRACKIO_DIR, or TRACKIO_SPACE_ID for a Space).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from overdrive.errors import UsageError

TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")
# Folders under the output dir that the trackers write; a fresh run (--overwrite) should clear them too.
TRACKER_DIRS = ("tensorboard", "wandb", "mlruns")
PROJECT = "overdrive"
_MLFLOW_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
_MLFLOW_PARAM_CHARS = 6000  # MLflow's longest param value


def parse_report_to(value: str | Iterable[str] | None) -> list[str]:
    """Tracker names from `--report-to` (comma list) or a YAML list; `none` (or nothing) means no tracker."""
    if value is None:
        return []
    pieces = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    names = [p.strip().lower() for p in pieces if p.strip()]
    valid = f"choose none or a comma list of {', '.join(TRACKERS)}"
    if not names:
        if isinstance(value, str):
            raise UsageError(f"--report-to is empty; {valid}")
        return []
    unknown = [n for n in names if n not in (*TRACKERS, "none")]
    if unknown:
        raise UsageError(f"--report-to {','.join(unknown)}: unknown tracker; {valid}")
    if "none" in names:
        if len(set(names)) > 1:
            raise UsageError(
                f"--report-to {','.join(names)}: 'none' cannot be combined with trackers; {valid}"
            )
        return []
    return list(dict.fromkeys(names))


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or half-imported package counts as missing
        return False


def check_available(names: Iterable[str]) -> None:
    """Fail with one line naming the extra to install, before the run writes anything."""
    missing = [n for n in names if not _installed(n)]
    if missing:
        joined = ",".join(missing)
        packages = " and ".join(missing)
        noun = "package" if len(missing) == 1 else "packages"
        raise UsageError(
            f"--report-to {joined} needs the {packages} {noun}; pip install 'overdrive[{joined}]'"
        )


def to_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """metrics.jsonl record -> tracker scalars: eval_* under eval/, the rest under train/; numbers only."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "step" or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = f"eval/{key[len('eval_') :]}" if key.startswith("eval_") else f"train/{key}"
        out[name] = float(value)
    return out


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as JSON types (paths and other objects become strings)."""
    return json.loads(json.dumps(dict(config), default=str))


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a.b": scalar}; lists become JSON text, None becomes "null"."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{name}."))
        elif value is None or isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def _config_text(config: Mapping[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(_plain(config), sort_keys=False)


class Backend(Protocol):
    name: str

    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self, ok: bool) -> None: ...


class TensorBoardBackend:
    """Event files under OUTPUT/tensorboard, flushed on every log so a crash loses nothing logged."""

    name = "tensorboard"

    def __init__(self, log_dir: Path, config: Mapping[str, Any], resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # On resume, events after the checkpoint step in earlier files are dropped by TensorBoard.
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(log_dir / "tensorboard"), purge_step=purge)
        text = "\n".join("    " + line for line in _config_text(config).splitlines())
        self.writer.add_text("config", text, global_step=resume_step or 0)
        self._hparams_end = self._write_hparams(config)
        self.writer.flush()

    def _write_hparams(self, config: Mapping[str, Any]) -> Any:
        """The config in TensorBoard's HPARAMS tab, in this run's own directory (add_hparams makes a new one).

        Returns the session-end summary, written by close() when the run ends well.
        """
        from torch.utils.tensorboard.summary import hparams

        experiment, start, end = hparams(_flat(_plain(config)), {"train/loss": 0.0, "eval/loss": 0.0})
        file_writer = self.writer._get_file_writer()
        file_writer.add_summary(experiment)
        file_writer.add_summary(start)
        return end

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def close(self, ok: bool) -> None:
        if ok:
            self.writer._get_file_writer().add_summary(self._hparams_end)
        self.writer.close()


class WandbBackend:
    """A W&B run, offline unless WANDB_MODE says otherwise (sync later with `wandb sync OUTPUT/wandb/...`)."""

    name = "wandb"

    def __init__(self, log_dir: Path, config: Mapping[str, Any], run_name: str) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or PROJECT,
            name=run_name,
            dir=None if os.environ.get("WANDB_DIR") else str(log_dir),
            mode=os.environ.get("WANDB_MODE") or "offline",
            config=_plain(config),
        )

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class TrackioBackend:
    """A trackio run through its wandb-like API, in trackio's own local store (or a Space if configured)."""

    name = "trackio"

    def __init__(self, config: Mapping[str, Any], run_name: str) -> None:
        import trackio

        self.trackio = trackio
        trackio.init(project=PROJECT, name=run_name, config=_plain(config))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.trackio.log(scalars, step=step)

    def close(self, ok: bool) -> None:
        self.trackio.finish()


class MlflowBackend:
    """An MLflow run through a client of its own (no global active run), by default in OUTPUT/mlruns."""

    name = "mlflow"

    def __init__(self, log_dir: Path, config: Mapping[str, Any], run_name: str) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        store = log_dir / "mlruns"
        if not uri:  # MLflow 3 refuses a plain file store; SQLite keeps the run in one local file
            store.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{store.resolve() / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            artifacts = (
                None if os.environ.get("MLFLOW_TRACKING_URI") else (store / "artifacts").resolve().as_uri()
            )
            experiment_id = self.client.create_experiment(experiment_name, artifact_location=artifacts)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(k, str(v)[:_MLFLOW_PARAM_CHARS]) for k, v in _flat(_plain(config)).items()]
        for i in range(0, len(params), _MLFLOW_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + _MLFLOW_PARAMS_PER_BATCH])
        self.client.log_text(self.run_id, _config_text(config), "config.yaml")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class Tracker:
    """Fan-out over the open backends. With none it does nothing, so callers never need to check."""

    def __init__(self, backends: Iterable[Backend] = ()) -> None:
        self.backends = list(backends)
        self.failures: dict[str, int] = {}
        self._closed = False

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.backends]

    def log(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Send one metrics.jsonl record; a backend that raises is warned about once and the run goes on."""
        values = to_scalars(scalars)
        if not values or self._closed:
            return
        for backend in self.backends:
            try:
                backend.log(step, values)
            except Exception as exc:  # a tracker must never end the training run
                self._failed(backend.name, f"failed to log step {step}", exc)

    def close(self, ok: bool = True) -> None:
        """Finish every backend (marking the run failed when `ok` is false); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for backend in self.backends:
            try:
                backend.close(ok)
            except Exception as exc:
                self._failed(backend.name, "failed to close", exc)
        for name, count in self.failures.items():
            if count > 1:
                warnings.warn(f"overdrive: --report-to {name} failed {count} times in this run", stacklevel=2)

    def _failed(self, name: str, what: str, exc: Exception) -> None:
        self.failures[name] = self.failures.get(name, 0) + 1
        if self.failures[name] == 1:
            warnings.warn(
                f"overdrive: --report-to {name} {what} ({_first_line(exc)}); training goes on and "
                "metrics.jsonl keeps every record",
                stacklevel=3,
            )

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(ok=exc_type is None)


def _open_one(
    name: str, log_dir: Path, config: Mapping[str, Any], run_name: str, resume_step: int | None
) -> Backend:
    if name == "tensorboard":
        return TensorBoardBackend(log_dir, config, resume_step)
    if name == "wandb":
        return WandbBackend(log_dir, config, run_name)
    if name == "trackio":
        return TrackioBackend(config, run_name)
    if name == "mlflow":
        return MlflowBackend(log_dir, config, run_name)
    raise UsageError(
        f"--report-to {name}: unknown tracker; choose none or a comma list of {', '.join(TRACKERS)}"
    )


def open_trackers(
    names: Iterable[str],
    log_dir: Path,
    config: Mapping[str, Any],
    run_name: str,
    *,
    resume_step: int | None = None,
) -> Tracker:
    """Start each named tracker for a run whose output directory is `log_dir`.

    `resume_step` (the checkpoint step of a resumed run) lets TensorBoard drop the events logged after it.
    A tracker that cannot start (broken install, W&B online without a login, unreachable MLflow server) ends
    the run now with one line rather than hours later; the trackers already started are closed.
    """
    names = list(names)
    check_available(names)
    backends: list[Backend] = []
    for name in names:
        try:
            backends.append(_open_one(name, Path(log_dir), config, run_name, resume_step))
        except Exception as exc:
            Tracker(backends).close(ok=False)
            if isinstance(exc, UsageError):
                raise
            raise UsageError(
                f"--report-to {name} could not start ({_first_line(exc)}); fix it or leave {name} out"
            ) from exc
    return Tracker(backends)
