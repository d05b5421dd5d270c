"""Atomic writes: complete files with ordinary permissions, no temporary left behind; --overwrite removal."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from overdrive.atomic import remove_entries, write_bytes, write_json, write_text


def test_written_files_get_the_mode_open_would_give(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        write_text(tmp_path / "a.txt", "hello")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640  # not mkstemp's 0600


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    write_json(target, {"ok": 1})
    with pytest.raises(TypeError):
        write_bytes(target, "text, not bytes")  # fails inside the write, after the temporary exists
    assert target.read_text().strip().startswith("{") and '"ok": 1' in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_remove_entries_removes_only_the_named_ones(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "x").write_text("1")
    (tmp_path / "metrics.jsonl").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    remove_entries(tmp_path, ["checkpoints", "metrics.jsonl", "absent"])
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
