"""Bad data files: one line naming the cause and the fix, exit code 2, no traceback, no output dir."""

from __future__ import annotations

import bz2
import gzip
import json
import os
from pathlib import Path

import pytest

from overdrive.data.sources import load_raw
from tests.conftest import cli_error, micro_args

RECORDS = [{"text": f"sentence number {i} about the weather and the sea", "n": i} for i in range(40)]
JSONL = "".join(json.dumps(r) + "\n" for r in RECORDS)
CSV = "text,n\n" + "".join(f"{r['text']},{r['n']}\n" for r in RECORDS)


# (file name, content, extra flags, phrases the message must hold)
CASES: dict[str, tuple[str, str | bytes, list[str], list[str]]] = {
    "csv_ragged_rows": (
        "ragged.csv",
        "text,label\nhello world,1\nfoo,2,extra,more\nbar,3\n",
        [],
        ["line 3 has 4 fields but the header has 2", "quote fields"],
    ),
    "csv_int_text_column": ("ints.csv", CSV, ["--text-column", "n"], ["'n'", "int64 numbers, not text"]),
    "jsonl_int_text_column": ("ints.jsonl", JSONL, ["--text-column", "n"], ["int64 numbers, not text"]),
    "one_line_file": (
        "one.txt",
        "only one line of text in this file\n",
        [],
        ["has 1 row", "hold out 5%", "--validation-split-percentage 0", "--validation-file"],
    ),
    "binary_txt": (
        "binary.txt",
        b"hello\n\xff\xfe\x00\x01garbage\x80\n" * 10,
        [],
        ["is not UTF-8 text", "byte 0xff at offset 6", "iconv"],
    ),
    "latin1_txt": ("latin1.txt", "café au lait\n".encode("latin-1") * 30, [], ["byte 0xe9 at offset 3"]),
    "utf16_txt": ("utf16.txt", "hello world\n".encode("utf-16") * 20, [], ["UTF-16", "iconv -f utf-16"]),
    "png_named_txt": ("png.txt", b"\x89PNG\r\n\x1a\n" + bytes(range(256)), [], ["PNG image", "offset 0"]),
    "gzip_of_binary": ("gz.txt", gzip.compress(bytes(range(256)) * 4), [], ["gzip archive", "not UTF-8"]),
    "binary_jsonl": ("bin.jsonl", b'{"text": "ok"}\n\xff\xfe\x00\n', [], ["not UTF-8 text", "offset 15"]),
    "binary_csv": ("bin.csv", b"text\n\xff\xfe\x00\n", [], ["not UTF-8 text", "offset 5"]),
    "json_invalid": ("bad.json", "{not json at all\n", [], ["is not valid JSON", "line 1 column 2"]),
    "jsonl_bad_line": ("bad.jsonl", '{"text": "ok"}\n{broken\n', [], ["is not valid JSON", "line 2"]),
    "json_scalar": ("scalar.json", "42\n", [], ["JSON number, not an object", "JSON Lines"]),
    "parquet_not_parquet": ("bad.parquet", "this is plain text\n", [], ["is not a Parquet file"]),
    "parquet_truncated": ("cut.parquet", b"PAR1" + b"\x00" * 64, [], ["not a readable Parquet file"]),
    "whitespace_txt": ("blank.txt", "   \n\n \t \n", [], ["holds only whitespace"]),
    "whitespace_jsonl": ("blank.jsonl", "\n  \n", [], ["holds only whitespace"]),
    "blank_text_rows": (
        "blanks.jsonl",
        "".join(json.dumps({"text": t}) + "\n" for t in ["   ", "", "\t"] * 10),
        [],
        ["has no text", "empty or blank"],
    ),
    "json_single_object_of_records": (
        "wrapped.json",
        json.dumps({"version": 1, "data": RECORDS}),
        [],
        ["single record whose 'data' field holds lists", "JSON Lines"],
    ),
    "json_single_object": ("obj.json", json.dumps({"text": "one object"}), [], ["has 1 row", "hold out"]),
    "no_text_column_numbers": (
        "numbers.csv",
        "a,b\n" + "".join(f"{i},{2 * i}\n" for i in range(30)),
        [],
        ["has no text column", "a (int64 numbers)", "a column of text"],
    ),
    "no_column_named_text": (
        "names.jsonl",
        "".join(json.dumps({"title": r["text"], "body": r["text"]}) + "\n" for r in RECORDS),
        [],
        ["no 'text' column", "title, body", "--text-column"],
    ),
    "text_column_all_null": (
        "nulls.jsonl",
        "".join(json.dumps({"text": None}) + "\n" for _ in range(30)),
        [],
        ["holds only nulls"],
    ),
    "text_column_mixed_types": (
        "mixed.jsonl",
        json.dumps({"text": "a"}) + "\n" + json.dumps({"text": 3}) + "\n",
        [],
        ["mixed JSON values"],
    ),
}


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_train_file(case, micro_config, tmp_path, capsys) -> None:
    name, content, extra, phrases = CASES[case]
    data = write(tmp_path / name, content)
    out = tmp_path / "run"
    err = cli_error(micro_args(micro_config, data, out, *extra), capsys)
    for phrase in phrases:
        assert phrase in err, err
    assert not out.exists()


@pytest.mark.parametrize("case", ["csv_ragged_rows", "binary_txt", "jsonl_bad_line"])
def test_bad_validation_file_is_named(case, micro_config, text_file, tmp_path, capsys) -> None:
    name, content, _, phrases = CASES[case]
    suffix = Path(name).suffix  # a valid train file of the validation file's format
    train = write(
        tmp_path / f"train{suffix}", {".csv": CSV, ".jsonl": JSONL}.get(suffix, text_file.read_text())
    )
    val = write(tmp_path / name, content)
    out = tmp_path / "run"
    err = cli_error(micro_args(micro_config, train, out, "--validation-file", str(val)), capsys)
    assert f"--validation-file {val}" in err and phrases[0] in err
    assert not out.exists()


def test_validation_file_of_another_format(micro_config, text_file, tmp_path, capsys) -> None:
    val = write(tmp_path / "val.jsonl", JSONL)
    out = tmp_path / "run"
    err = cli_error(micro_args(micro_config, text_file, out, "--validation-file", str(val)), capsys)
    assert f"--validation-file {val} is json but --train-file {text_file} is text" in err
    assert "one format" in err
    assert not out.exists()


def test_train_file_is_a_directory(micro_config, tmp_path, capsys) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    out = tmp_path / "run"
    err = cli_error(micro_args(micro_config, folder, out), capsys)
    assert f"--train-file {folder} is a directory; pass a data file" in err
    assert not out.exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads a chmod 000 file anyway")
def test_unreadable_train_file(micro_config, text_file, tmp_path, capsys) -> None:
    locked = write(tmp_path / "locked.txt", text_file.read_text())
    locked.chmod(0)
    out = tmp_path / "run"
    try:
        err = cli_error(micro_args(micro_config, locked, out), capsys)
    finally:
        locked.chmod(0o644)
    assert "cannot be read (permission denied)" in err and "chmod" in err
    assert not out.exists()


def test_permission_denied_is_one_line_even_as_root(micro_config, text_file, tmp_path, monkeypatch, capsys):
    """The same path as above, with the denial simulated so that it runs under root too."""
    locked = write(tmp_path / "locked.txt", text_file.read_text())
    real_open = Path.open

    def deny(self: Path, *args, **kwargs):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", deny)
    out = tmp_path / "run"
    err = cli_error(micro_args(micro_config, locked, out), capsys)
    assert f"--train-file {locked} cannot be read (permission denied)" in err
    assert not out.exists()


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress])
def test_compressed_text_under_a_txt_name_is_still_read(compress, tmp_path) -> None:
    """datasets decompresses by magic bytes: the UTF-8 diagnosis must not turn that into an error."""
    packed = write(tmp_path / "packed.txt", compress(b"hello world\nsecond line\n" * 20))
    raw, column, _ = load_raw(
        dataset=None,
        dataset_config=None,
        train_file=str(packed),
        validation_file=None,
        text_column=None,
        validation_split_percentage=0,
        seed=0,
    )
    assert column == "text" and len(raw["train"]) == 40
    assert raw["train"][0]["text"] == "hello world"


def test_two_rows_split_without_error(tmp_path) -> None:
    """The smallest data that can be held out from is accepted: 1 row for training, 1 for validation."""
    two = write(tmp_path / "two.txt", "first line of text\nsecond line of text\n")
    raw, _, _ = load_raw(
        dataset=None,
        dataset_config=None,
        train_file=str(two),
        validation_file=None,
        text_column=None,
        validation_split_percentage=5,
        seed=0,
    )
    assert (len(raw["train"]), len(raw["validation"])) == (1, 1)
