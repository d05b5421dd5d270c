"""No run's output is lost, no checkpoint file runs code, and a damaged checkpoint is never resumed half-read.

One finished run (checkpoints at steps 2 and 4, evals at 0, 2 and 4) is made once; each test works on a copy.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from overdrive.cli import main
from overdrive.metrics import read_metrics
from overdrive.parallel.checkpoint import MARKER
from overdrive.train.rundir import LOCK_NAME, lock_run_dir
from tests.conftest import micro_args

RUN = ["--max-steps", "4", "--save-steps", "2", "--eval-steps", "2", "--logging-steps", "1"]
RUN += ["--save-total-limit", "5", "--max-eval-batches", "2", "--global-batch-size", "4"]
RUN += ["--micro-batch-size", "4"]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("overdrive: error: ")]
    assert len(errors) == 1 and not any("Traceback" in line for line in err), err
    return errors[0]


@pytest.fixture(scope="module")
def finished(micro_config, text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(micro_args(micro_config, text_file, out, *RUN)) == 0
    return out


@pytest.fixture
def run_copy(finished: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def set_manifest_size(checkpoint: Path, name: str) -> None:
    """Make the manifest agree with a file the test replaced, so the loader itself meets the bad file."""
    meta = json.loads((checkpoint / MARKER).read_text())
    meta["files"][name] = (checkpoint / name).stat().st_size
    (checkpoint / MARKER).write_text(json.dumps(meta))


def test_resume_latest_never_replaces_a_finished_run_without_checkpoints(
    run_copy, micro_config, text_file, capsys
) -> None:
    shutil.rmtree(run_copy / "checkpoints")
    before = snapshot(run_copy)
    code = main(micro_args(micro_config, text_file, run_copy, *RUN, "--resume", "latest"))
    assert code == 2
    assert "holds a run with no complete checkpoint" in one_error_line(capsys)
    assert snapshot(run_copy) == before


def test_a_run_dir_held_by_another_run_is_refused_naming_its_pid(
    micro_config, text_file, tmp_path, capsys
) -> None:
    out = tmp_path / "run"
    holder = lock_run_dir(out)
    try:
        assert main(micro_args(micro_config, text_file, out, "--max-steps", "1")) == 2
    finally:
        holder.close()
    assert f"in use by another overdrive run (pid {os.getpid()}" in one_error_line(capsys)
    assert [p.name for p in out.iterdir()] == [LOCK_NAME]


def test_two_runs_started_together_into_one_dir(micro_config, text_file, tmp_path) -> None:
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "overdrive", *micro_args(micro_config, text_file, out, "--max-steps", "3")]
    procs = [subprocess.Popen(argv, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((p.wait(timeout=300), p.stderr.read()) for p in procs)
    assert [code for code, _ in results] == [0, 2], results
    assert results[1][1].strip().startswith("overdrive: error: output dir")
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 3]  # one run's lines only (logging every 10 steps: first and last)


def test_crafted_dcp_metadata_is_refused_on_export_and_resume(
    micro_config, text_file, tmp_path, capsys
) -> None:
    out = tmp_path / "fsdp"
    argv = micro_args(micro_config, text_file, out, "--max-steps", "2", "--save-steps", "1")
    assert main([*argv, "--strategy", "fsdp", "--no-export", "--max-new-tokens", "0"]) == 0
    checkpoint = out / "checkpoints" / "step-0000002"
    pwned = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {pwned}",))

    (checkpoint / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload()))
    set_manifest_size(checkpoint, "dcp/.metadata")
    capsys.readouterr()
    assert main(["export", str(checkpoint), str(tmp_path / "exported")]) == 2
    assert "not a valid DCP metadata file" in one_error_line(capsys)
    resume = [*argv, "--strategy", "fsdp", "--max-steps", "3", "--resume", str(checkpoint)]
    assert main(resume) == 2
    assert "not a valid DCP metadata file" in one_error_line(capsys)
    assert not pwned.exists() and not (tmp_path / "exported").exists()


def test_a_checkpoint_missing_a_file_is_never_resumed(run_copy, micro_config, text_file, capsys) -> None:
    """What an in-place delete killed half-way leaves: the marker, without optimizer.pt."""
    (run_copy / "checkpoints" / "step-0000004" / "optimizer.pt").unlink()
    for name in ("final", "summary.json"):
        shutil.rmtree(run_copy / name) if name == "final" else (run_copy / name).unlink()
    assert main(micro_args(micro_config, text_file, run_copy, *RUN, "--resume", "latest")) == 0
    err = capsys.readouterr().err
    assert "skipping incomplete checkpoint" in err and "step-0000004" in err
    train = [r["step"] for r in read_metrics(run_copy / "metrics.jsonl") if "loss" in r]
    assert train == [1, 2, 3, 4]  # resumed from step 2: steps 3 and 4 ran again, logged once


def test_rotation_renames_before_deleting(tmp_path, monkeypatch) -> None:
    from overdrive.parallel import checkpoint as ckpt

    victim = tmp_path / "step-0000002"
    (victim / "dcp").mkdir(parents=True)
    (victim / MARKER).write_text("{}")
    (victim / "dcp" / "shard").write_bytes(b"x")

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt  # SIGKILL stand-in: the delete stops after the rename

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.remove_checkpoint(victim)
    assert not victim.exists() and (tmp_path / ".step-0000002.trash").is_dir()
    monkeypatch.undo()
    ckpt.remove_leftovers(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_non_finite_loss_stops_with_exit_3_and_keeps_the_last_good_checkpoint(
    micro_config, text_file, tmp_path, capsys
) -> None:
    out = tmp_path / "run"
    argv = micro_args(micro_config, text_file, out, "--learning-rate", "1e30", "--max-grad-norm", "0")
    assert main([*argv, "--save-steps", "1", "--max-steps", "6"]) == 3
    line = one_error_line(capsys)
    assert "loss became nan" in line and "last good checkpoint" in line
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept and all(json.loads((out / "checkpoints" / k / MARKER).read_text()) for k in kept)
    assert not (out / "final").exists() and not (out / "summary.json").exists()


@pytest.mark.parametrize("damage", ["truncated-weights", "pickle-optimizer", "truncated-unlisted"])
def test_damaged_checkpoint_files_give_one_line(damage, run_copy, micro_config, text_file, capsys) -> None:
    checkpoint = run_copy / "checkpoints" / "step-0000002"
    weights = checkpoint / "model.safetensors"
    if damage == "pickle-optimizer":

        class Payload:
            def __reduce__(self):
                return (os.system, ("true",))

        (checkpoint / "optimizer.pt").write_bytes(pickle.dumps(Payload()))
        set_manifest_size(checkpoint, "optimizer.pt")
        expected = "not plain tensors"
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
        if damage == "truncated-weights":
            set_manifest_size(checkpoint, "model.safetensors")
            expected = "could not be loaded"
        else:
            expected = "is incomplete (model.safetensors has 1000 bytes"
    before = snapshot(run_copy)
    code = main(micro_args(micro_config, text_file, run_copy, *RUN, "--resume", str(checkpoint)))
    assert code == 2
    assert expected in one_error_line(capsys)
    assert snapshot(run_copy) == before


def test_resume_drops_a_torn_metrics_line_and_logs_each_step_once(
    run_copy, micro_config, text_file, capsys
) -> None:
    """A run killed while exporting, with a metrics line torn: resuming finishes it, one line per step."""
    shutil.rmtree(run_copy / "final")
    original = json.loads((run_copy / "summary.json").read_text())
    (run_copy / "summary.json").unlink()
    with open(run_copy / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "eval_lo')
    assert main(micro_args(micro_config, text_file, run_copy, *RUN, "--resume", "latest")) == 0
    assert "dropped the torn last line" in capsys.readouterr().err
    records = read_metrics(run_copy / "metrics.jsonl")
    keys = [(r["step"], "eval_loss" in r) for r in records]
    assert len(keys) == len(set(keys)) and (4, True) in keys
    summary = json.loads((run_copy / "summary.json").read_text())
    assert summary["first_eval_loss"] == original["first_eval_loss"]  # step 0's, not the resume's
    assert (run_copy / "final" / "model.safetensors").is_file()


def test_read_only_output_location_fails_before_set_up(micro_config, text_file, tmp_path) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a read-only filesystem")
    ro = tmp_path / "ro"
    ro.mkdir()
    train = shlex_join([sys.executable, "-m", "overdrive", *micro_args(micro_config, text_file, ro / "run")])
    script = f"mount -t tmpfs -o ro none {ro} && exec {train}"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    if "mount" in proc.stderr and "overdrive" not in proc.stderr:
        pytest.skip(f"cannot mount here: {proc.stderr.strip()}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"overdrive: error: cannot write to {ro} (read-only file system); pass a writable --output-dir"
    ]


def shlex_join(argv: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in argv)


def test_empty_prompt_samples_from_bos(micro_config, text_file, tmp_path) -> None:
    out = tmp_path / "run"
    assert main(micro_args(micro_config, text_file, out, "--max-steps", "1", "--prompt", "")) == 0
    assert (out / "summary.json").is_file() and (out / "sample.txt").is_file()


def test_export_checks_the_tokenizer_first_and_names_run_dirs(finished, tmp_path, capsys) -> None:
    checkpoint = finished / "checkpoints" / "step-0000004"
    out = tmp_path / "exported"
    assert main(["export", str(checkpoint), str(out), "--tokenizer", str(tmp_path / "missing")]) == 2
    assert "--tokenizer" in one_error_line(capsys) and not out.exists()
    assert main(["export", str(finished), str(out)]) == 2
    assert "is a run directory, not a checkpoint" in one_error_line(capsys) and not out.exists()


def test_resuming_another_models_checkpoint_says_so(finished, micro_config, text_file, tmp_path, capsys):
    bigger = json.loads(micro_config.read_text()) | {"hidden_size": 128}
    config = tmp_path / "bigger.json"
    config.write_text(json.dumps(bigger))
    checkpoint = finished / "checkpoints" / "step-0000002"
    argv = micro_args(config, text_file, tmp_path / "run", *RUN, "--resume", str(checkpoint))
    assert main(argv) == 2
    assert "written for a different model" in one_error_line(capsys)


def test_exported_model_has_ordinary_permissions(micro_config, text_file, tmp_path) -> None:
    previous = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert (
            main(micro_args(micro_config, text_file, out, "--max-steps", "1", "--max-new-tokens", "0")) == 0
        )
    finally:
        os.umask(previous)
    assert stat.S_IMODE((out / "final").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "final" / "model.safetensors").stat().st_mode) == 0o644
