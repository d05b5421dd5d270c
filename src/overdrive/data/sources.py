"""Raw text in, `DatasetDict(train, validation)` out — from the hub, local files or the embedded default."""

from __future__ import annotations

import math
from pathlib import Path

from datasets import Dataset, DatasetDict, Features, LargeList, List, Value, load_dataset

from overdrive.data.filecheck import check_head, describe_read_error, first_line
from overdrive.errors import UsageError
from overdrive.hub import offline_var, quiet_logs, require_hub

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
    """Cheap checks of a local data file (exists, a file, readable, a known format, not blank)."""
    p = Path(path)
    kinds = ", ".join(sorted(EXTENSION_BUILDERS))
    if p.is_dir():
        raise UsageError(f"{flag} {path} is a directory; pass a data file ({kinds})")
    if not p.exists():
        raise UsageError(f"{flag} {path} does not exist; pass an existing file")
    if not p.is_file():
        raise UsageError(f"{flag} {path} is not a regular file; pass a data file ({kinds})")
    if p.suffix.lower() not in EXTENSION_BUILDERS:
        raise UsageError(f"{flag} {path} has an unsupported extension; use one of {kinds}")
    size = p.stat().st_size
    if size == 0:
        raise UsageError(f"{flag} {path} is empty; pass a file with text in it")
    check_head(p, flag, builder_of(str(p)), size)
    return str(p)


def builder_of(path: str) -> str:
    return EXTENSION_BUILDERS[Path(path).suffix.lower()]


def read_file(path: str, flag: str, cache_dir: str | None = None) -> Dataset:
    """One local file as a Dataset; a failure says what is wrong with the file."""
    builder = builder_of(path)
    try:
        with quiet_logs():
            return load_dataset(builder, data_files={"train": path}, split="train", cache_dir=cache_dir)
    except Exception as exc:  # datasets raises many kinds for unreadable files
        raise UsageError(describe_read_error(Path(path), flag, builder, exc)) from None


def load_files(train_file: str, validation_file: str | None, cache_dir: str | None = None) -> DatasetDict:
    """--train-file (and --validation-file, in the same format), each checked before either is read."""
    train_path = check_file(train_file, "--train-file")
    val_path = check_file(validation_file, "--validation-file") if validation_file else None
    if val_path is not None and builder_of(val_path) != builder_of(train_path):
        raise UsageError(
            f"--validation-file {val_path} is {builder_of(val_path)} but --train-file {train_path} is "
            f"{builder_of(train_path)}; pass both files in one format"
        )
    splits = {"train": read_file(train_path, "--train-file", cache_dir)}
    if val_path is not None:
        splits["validation"] = read_file(val_path, "--validation-file", cache_dir)
    return DatasetDict(splits)


def load_hub_dataset(dataset: str, dataset_config: str | None, cache_dir: str | None = None) -> DatasetDict:
    require_hub(dataset, "--dataset", cached_files=None)
    try:
        with quiet_logs():
            raw = load_dataset(dataset, dataset_config, cache_dir=cache_dir)
    except Exception as exc:
        var = offline_var()
        if var is not None:
            raise UsageError(
                f"--dataset {dataset} is not in the local cache and the hub is offline ({var}=1); "
                f"pass --train-file or unset {var}"
            ) from None
        raise UsageError(
            f"could not load dataset {dataset!r}: {first_line(exc)}; check the name or use --train-file"
        ) from None
    if not isinstance(raw, DatasetDict):
        raise UsageError(f"--dataset {dataset} is not a dataset with splits; pass one with a 'train' split")
    return raw


def load_raw(
    *,
    dataset: str | None,
    dataset_config: str | None,
    train_file: str | None,
    validation_file: str | None,
    text_column: str | None,
    validation_split_percentage: int,
    seed: int,
    cache_dir: str | None = None,
    data_format: str = "text",
) -> tuple[DatasetDict, str, str]:
    """Return (datasets with train and validation, the text column, a name for the source).

    Instruction data (`data_format` prompt-completion or chat) returns the first column its format reads."""
    if train_file:
        raw = load_files(train_file, validation_file, cache_dir)
        source = str(Path(train_file))
    elif dataset:
        raw = load_hub_dataset(dataset, dataset_config, cache_dir)
        source = dataset if dataset_config is None else f"{dataset}/{dataset_config}"
    elif validation_file:
        raise UsageError("--validation-file needs --train-file")
    else:
        raw = DatasetDict({"train": Dataset.from_dict({"text": embedded_texts()})})
        source = EMBEDDED_NAME

    if "train" not in raw:
        raise UsageError(f"{source} has no 'train' split; pass a dataset with one")
    raw = DatasetDict({name: split for name, split in raw.items() if name in ("train", "validation")})
    if data_format == "text":
        column = check_text_splits(raw, text_column, source)
    else:
        from overdrive.data.instruction import check_columns

        for name, split in raw.items():
            column = check_columns(split, data_format, source if name == "train" else f"the {name} data")
    if len(raw["train"]) == 0:
        raise UsageError(f"{source} has no training rows; pass data with text in it")
    if "validation" not in raw and validation_split_percentage > 0:
        raw = hold_out(raw["train"], validation_split_percentage, seed, source)
    return raw, column, source


def check_text_splits(raw: DatasetDict, text_column: str | None, source: str) -> str:
    check_single_record(raw["train"], source)
    column = resolve_text_column(raw["train"].features, text_column, source)
    if "validation" in raw and column not in raw["validation"].column_names:
        raise UsageError(f"validation data has no column '{column}'; make both files use the same columns")
    for name, split in raw.items():
        check_text_column(split, column, source if name == "train" else f"the {name} data")
    return column


def hold_out(train: Dataset, percentage: int, seed: int, source: str) -> DatasetDict:
    """Split `percentage`% of the training rows off for validation, refusing a split that leaves none."""
    rows = len(train)
    held = math.ceil(percentage / 100 * rows)  # datasets' own rounding
    too_small = UsageError(
        f"{source} has {rows} row{'s' if rows != 1 else ''}, too few to hold out {percentage}% for validation "
        "and keep some for training; add data, pass --validation-split-percentage 0, or pass a --validation-file"
    )
    if rows - held < 1:
        raise too_small
    try:
        parts = train.train_test_split(test_size=percentage / 100, shuffle=True, seed=seed)
    except ValueError:
        raise too_small from None
    return DatasetDict({"train": parts["train"], "validation": parts["test"]})


def is_text(feature: object) -> bool:
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def describe_feature(feature: object) -> str:
    """What a non-text column holds, in words."""
    if isinstance(feature, Value):
        if feature.dtype.startswith(("int", "uint", "float", "decimal")):
            return f"{feature.dtype} numbers"
        if feature.dtype == "bool":
            return "true/false values"
        if feature.dtype == "null":
            return "only nulls"
        return f"{feature.dtype} values"
    if isinstance(feature, dict):
        return "objects"
    if isinstance(feature, (List, LargeList)) or type(feature).__name__ in ("Sequence", "List", "LargeList"):
        return "lists"
    if type(feature).__name__ == "Json":
        return "mixed JSON values (not only strings)"
    return f"{type(feature).__name__} values"


def check_single_record(split: Dataset, source: str) -> None:
    """A JSON file that is one object wrapping its records (`{"data": [...]}`) reads as one row of lists."""
    if len(split) != 1:
        return
    nested = [c for c, f in split.features.items() if describe_feature(f) in ("lists", "objects")]
    if nested:
        raise UsageError(
            f"{source} is a single record whose '{nested[0]}' field holds {describe_feature(split.features[nested[0]])}; "
            "write one record per line (JSON Lines) or a top-level list of records, each with a text field"
        )


def check_text_column(split: Dataset, column: str, source: str) -> None:
    feature = split.features[column]
    if is_text(feature):
        return
    holds = describe_feature(feature)
    others = [c for c, f in split.features.items() if is_text(f)]
    pick = (
        f"pick a text column with --text-column (text columns: {', '.join(others)})"
        if others
        else "pass data with a column of text"
    )
    raise UsageError(f"column '{column}' of {source} holds {holds}, not text; {pick}")


def resolve_text_column(features: Features, requested: str | None, source: str) -> str:
    columns = list(features)
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
    texts = [c for c in columns if is_text(features[c])]
    if not texts:
        described = ", ".join(f"{c} ({describe_feature(features[c])})" for c in columns)
        raise UsageError(
            f"{source} has no text column (columns: {described}); pass data with a column of text"
        )
    raise UsageError(
        f"{source} has no 'text' column (columns holding text: {', '.join(texts)}); "
        "pass the one to train on to --text-column"
    )
