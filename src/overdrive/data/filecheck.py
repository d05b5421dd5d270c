"""Why a local data file cannot be read, in one line that names the cause and the fix.

`datasets` wraps every reader failure in "An error occurred while generating the dataset", which names neither.
The cheap checks here run before loading (the file opens, is not blank, a .parquet is Parquet); the costly
ones (scanning for the first invalid UTF-8 byte, finding the first bad JSON line) run only once loading failed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from overdrive.errors import UsageError

HEAD_BYTES = 64 * 1024
SCAN_CHUNK = 1 << 20
MAX_JSON_DOCUMENT = 256 * 1024 * 1024  # parse a whole .json only below this size when diagnosing

# datasets decompresses these transparently, whatever the file's extension
COMPRESSED = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"PK\x03\x04": "zip",
    b"\x04\x22\x4d\x18": "lz4",
}
LOOKS_LIKE = {
    b"\xff\xfe": "UTF-16 text",
    b"\xfe\xff": "UTF-16 text",
    b"PAR1": "a Parquet file",
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"%PDF": "a PDF document",
    b"\x7fELF": "an executable",
    b"SQLite format 3": "an SQLite database",
    b"\x80\x02": "a pickle",
}


def read_head(path: Path, flag: str) -> bytes:
    """The first bytes of the file; an unreadable file fails here with the reason."""
    try:
        with path.open("rb") as f:
            return f.read(HEAD_BYTES)
    except PermissionError:
        raise UsageError(
            f"{flag} {path} cannot be read (permission denied); make it readable (chmod a+r) or pass another file"
        ) from None
    except OSError as exc:
        raise UsageError(
            f"{flag} {path} cannot be read ({exc.strerror or exc}); pass a readable file"
        ) from None


def magic_name(head: bytes, table: dict[bytes, str]) -> str | None:
    return next((name for magic, name in table.items() if head.startswith(magic)), None)


def check_head(path: Path, flag: str, builder: str, size: int) -> None:
    """Cheap content checks before loading: blank text, a .parquet that is not Parquet."""
    head = read_head(path, flag)
    if builder == "parquet":
        if not head.startswith(b"PAR1"):
            kind = magic_name(head, LOOKS_LIKE | COMPRESSED)
            seen = f"it looks like {kind}" if kind else "no PAR1 magic bytes"
            raise UsageError(
                f"{flag} {path} is not a Parquet file ({seen}); pass a real .parquet file or give the file the "
                "extension of its format (.txt, .csv, .json, .jsonl)"
            )
        return
    if size <= len(head) and magic_name(head, COMPRESSED) is None and not head.strip():
        raise UsageError(f"{flag} {path} holds only whitespace; pass a file with text in it")


def first_invalid_utf8(path: Path) -> tuple[int, int] | None:
    """(byte offset, byte value) of the first byte that is not valid UTF-8, or None for a UTF-8 file."""
    offset, carry = 0, b""
    with path.open("rb") as f:
        while chunk := f.read(SCAN_CHUNK):
            data = carry + chunk
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as exc:
                if exc.reason == "unexpected end of data" and len(data) - exc.start < 4:
                    carry, offset = data[exc.start :], offset + exc.start  # a sequence cut by the chunk end
                    continue
                return offset + exc.start, data[exc.start]
            carry, offset = b"", offset + len(data)
    return (offset, carry[0]) if carry else None


def utf8_problem(path: Path, flag: str, head: bytes) -> str | None:
    """The message for a file that is not UTF-8 text, or None when it is."""
    bad = first_invalid_utf8(path)
    if bad is None:
        return None
    offset, byte = bad
    kind = magic_name(head, LOOKS_LIKE)
    if kind == "UTF-16 text":
        fix = "convert it: iconv -f utf-16 -t utf-8 FILE > NEW"
    elif kind is not None:
        fix = "pass a text file"
    else:
        fix = "re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8 FILE > NEW)"
    looks = f", it looks like {kind}" if kind else ""
    return (
        f"{flag} {path} is not UTF-8 text (byte 0x{byte:02x} at offset {offset} is not valid UTF-8{looks}); "
        f"{fix}"
    )


def chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and its causes, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def root_message(exc: BaseException) -> str:
    """The first cause that says more than datasets' generic wrapper."""
    for e in chain(exc):
        if type(e).__name__ != "DatasetGenerationError":
            return first_line(e)
    return first_line(exc)


def describe_read_error(path: Path, flag: str, builder: str, exc: BaseException) -> str:
    """One line for a file that `datasets` failed to read: the cause found in the file, and the fix."""
    where = f"{flag} {path}"
    head = read_head(path, flag)
    compression = magic_name(head, COMPRESSED)
    if builder != "parquet":
        if compression is None:
            problem = utf8_problem(path, flag, head)
            if problem:
                return problem
        elif any(isinstance(e, UnicodeDecodeError) for e in chain(exc)):
            return f"{where} is a {compression} archive whose content is not UTF-8 text; pass UTF-8 text"
    if builder == "csv":
        found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(list(chain(exc))))
        if found:
            header, line, saw = found.groups()
            return (
                f"{where}: line {line} has {saw} fields but the header has {header}; quote fields that "
                'contain commas ("a, b") or fix that row'
            )
    if builder == "json" and compression is None:
        problem = json_problem(path)
        if problem:
            return (
                f"{where} is not valid JSON ({problem}); write one JSON object per line (JSON Lines) "
                "or one list of objects"
            )
    if builder == "parquet":
        return f"{where} is not a readable Parquet file ({root_message(exc)}); pass an intact .parquet file"
    return f"could not read {where} as {builder}: {root_message(exc)}; check the file"


def json_problem(path: Path) -> str | None:
    """Where Python's json parser first fails in a JSON Lines file or a JSON document, or None if it parses."""
    with path.open(encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        json.loads(first)
    except ValueError:
        return document_problem(path)
    return lines_problem(path)


def lines_problem(path: Path) -> str | None:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                return f"line {number}: {exc.msg}"
            if not isinstance(value, dict):
                return f"line {number} is a JSON {json_kind(value)}, not an object"
    return None


def document_problem(path: Path) -> str | None:
    if path.stat().st_size > MAX_JSON_DOCUMENT:
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        return f"line {exc.lineno} column {exc.colno}: {exc.msg}"
    if isinstance(value, list):
        odd = next((v for v in value if not isinstance(v, dict)), None)
        if odd is not None:
            return f"its list holds a JSON {json_kind(odd)}, not only objects"
    elif not isinstance(value, dict):
        return f"it holds a single JSON {json_kind(value)}"
    return None


def json_kind(value: object) -> str:
    kinds = {str: "string", bool: "boolean", int: "number", float: "number", list: "list", dict: "object"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)
