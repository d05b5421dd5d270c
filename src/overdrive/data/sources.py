"""Raw text in, `DatasetDict(train, validation)` out — from the hub, local files or the embedded default."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset

from overdrive.errors import UsageError

EXTENSION_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}

EMBEDDED_NAME = "embedded:pydoc-topics"


def embedded_texts() -> list[str]:
    """English prose that is always available offline: CPython's own documentation topics."""
    from pydoc_data.topics import topics

    return [topics[key].strip() for key in sorted(topics) if topics[key].strip()]


def check_file(path: str, flag: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{flag} {path} does not exist; pass an existing file")
    if p.stat().st_size == 0:
        raise UsageError(f"{flag} {path} is empty; pass a file with text in it")
    if p.suffix.lower() not in EXTENSION_BUILDERS:
        kinds = ", ".join(sorted(EXTENSION_BUILDERS))
        raise UsageError(f"{flag} {path} has an unsupported extension; use one of {kinds}")
    return str(p)


def load_raw(
    *,
    dataset: str | None,
    dataset_config: str | None,
    train_file: str | None,
    validation_file: str | None,
    text_column: str | None,
    validation_split_percentage: int,
    seed: int,
) -> tuple[DatasetDict, str, str]:
    """Return (datasets with train and validation, the text column, a name for the source)."""
    if train_file:
        train_path = check_file(train_file, "--train-file")
        files = {"train": train_path}
        if validation_file:
            files["validation"] = check_file(validation_file, "--validation-file")
        builders = {EXTENSION_BUILDERS[Path(f).suffix.lower()] for f in files.values()}
        if len(builders) > 1:
            raise UsageError("--train-file and --validation-file must have the same format")
        builder = builders.pop()
        try:
            raw = load_dataset(builder, data_files=files)
        except Exception as exc:  # datasets raises many kinds for unreadable files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"could not read {train_path} as {builder}: {first}; check the file") from None
        source = train_path
    elif dataset:
        try:
            raw = load_dataset(dataset, dataset_config)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(
                f"could not load dataset {dataset!r}: {first}; check the name or use --train-file"
            ) from None
        source = dataset if dataset_config is None else f"{dataset}/{dataset_config}"
    elif validation_file:
        raise UsageError("--validation-file needs --train-file")
    else:
        raw = DatasetDict({"train": Dataset.from_dict({"text": embedded_texts()})})
        source = EMBEDDED_NAME

    if "train" not in raw:
        raise UsageError(f"{source} has no 'train' split; pass a dataset with one")
    column = resolve_text_column(raw["train"].column_names, text_column, source)
    raw = DatasetDict({name: split for name, split in raw.items() if name in ("train", "validation")})
    if "validation" in raw and column not in raw["validation"].column_names:
        raise UsageError(f"validation data has no column '{column}'; make both files use the same columns")
    if len(raw["train"]) == 0:
        raise UsageError(f"{source} has no training rows; pass data with text in it")
    if "validation" not in raw and validation_split_percentage > 0:
        parts = raw["train"].train_test_split(
            test_size=validation_split_percentage / 100, shuffle=True, seed=seed
        )
        raw = DatasetDict({"train": parts["train"], "validation": parts["test"]})
    return raw, column, source


def resolve_text_column(columns: list[str], requested: str | None, source: str) -> str:
    if requested is not None:
        if requested not in columns:
            raise UsageError(
                f"text column '{requested}' not in {source} (columns: {', '.join(columns)}); "
                "pass one of them to --text-column"
            )
        return requested
    if "text" in columns:
        return "text"
    if len(columns) == 1:
        return columns[0]
    raise UsageError(f"{source} has no 'text' column (columns: {', '.join(columns)}); pass --text-column")
