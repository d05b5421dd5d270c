"""Tokenise and cut text into fixed-length training rows.

`concat` follows run_clm: concatenate every document (each ended by EOS) and cut into `block_size` rows, the
tail of each map batch dropped. `documents` cuts the same stream but keeps the document structure: position
ids restart at 0 where a document starts (and at each row start), and the label of a document's first token is
ignored, so no prediction crosses a boundary. HF attention (sdpa/eager masks, flash varlen) reads the restart
points from `position_ids` and never attends across documents. Instruction examples are never cut:
`pack_examples` lays whole examples into padded rows (see overdrive.data.instruction).
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from overdrive.data.loader import IGNORE_INDEX
from overdrive.errors import UsageError

MAP_BATCH = 1000


def tokenize_documents(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids per document, each ended by EOS so documents stay apart in the stream."""
    if not texts:  # a batch of blank rows: fast tokenizers fail on an empty list
        return []
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is None:
        return [list(ids) for ids in encoded if ids]
    return [list(ids) + [eos] if not ids or ids[-1] != eos else list(ids) for ids in encoded if ids]


def chunk_concat(docs: list[list[int]], block_size: int) -> dict[str, list[list[int]]]:
    stream = np.fromiter((t for d in docs for t in d), dtype=np.int64)
    rows = len(stream) // block_size
    ids = stream[: rows * block_size].reshape(rows, block_size)
    return {"input_ids": ids.tolist(), "labels": ids.tolist()}


def chunk_documents(docs: list[list[int]], block_size: int) -> dict[str, list[list[int]]]:
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    stream = np.fromiter((t for d in docs for t in d), dtype=np.int64, count=int(lengths.sum()))
    starts = np.zeros(len(stream), dtype=bool)
    starts[np.concatenate(([0], np.cumsum(lengths)[:-1]))] = True
    rows = len(stream) // block_size
    n = rows * block_size
    ids = stream[:n].reshape(rows, block_size)
    is_start = starts[:n].reshape(rows, block_size).copy()
    is_start[:, 0] = True  # a row never sees the previous row: its first token starts a segment
    # position = distance to the last segment start in the row
    col = np.broadcast_to(np.arange(block_size), (rows, block_size))
    last_start = np.maximum.accumulate(np.where(is_start, col, 0), axis=1)
    positions = col - last_start
    labels = np.where(is_start, IGNORE_INDEX, ids)
    return {"input_ids": ids.tolist(), "labels": labels.tolist(), "position_ids": positions.tolist()}


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of at most `capacity` tokens: longest first, each into the fullest bin it fits."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - lengths[i], len(bins) - 1))
            continue
        room, b = free.pop(at)
        bins[b].append(i)
        bisect.insort(free, (room - lengths[i], b))
    return bins


def pack_examples(
    ids: list[list[int]], labels: list[list[int]], block_size: int, pad_id: int, packing: str
) -> dict[str, list[list[int]]]:
    """Whole examples (each at most `block_size` tokens, labels already masked) -> padded rows.

    `concat`: one example per row (instruction examples are never run together). `documents`: examples
    packed by best-fit decreasing, position ids restarting at each example and at the padding, so attention
    never crosses examples; the padding is never a target.
    """
    groups = best_fit_decreasing([len(x) for x in ids], block_size) if packing == "documents" else None
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    if groups is None:
        groups = [[i] for i in range(len(ids))]
    else:
        out["position_ids"] = []
    for group in groups:
        pad = block_size - sum(len(ids[i]) for i in group)
        out["input_ids"].append([t for i in group for t in ids[i]] + [pad_id] * pad)
        out["labels"].append([t for i in group for t in labels[i]] + [IGNORE_INDEX] * pad)
        if "position_ids" in out:
            out["position_ids"].append([p for i in group for p in range(len(ids[i]))] + list(range(pad)))
    return out


def build_lm_datasets(
    raw: DatasetDict,
    text_column: str,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    packing: str,
) -> DatasetDict:
    """Raw text splits -> rows of `block_size` tokens (cached by datasets' fingerprints for file data)."""
    chunk = chunk_documents if packing == "documents" else chunk_concat

    def process(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        texts = [t for t in batch[text_column] if isinstance(t, str) and t.strip()]
        return chunk(tokenize_documents(texts, tokenizer), block_size)

    out = {}
    for name, split in raw.items():
        out[name] = split.map(
            process,
            batched=True,
            batch_size=MAP_BATCH,
            remove_columns=split.column_names,
            desc=f"tokenize+{packing} {name}",
        )
    lm = DatasetDict(out)
    check_rows(lm, raw, text_column, tokenizer, block_size)
    return lm


def check_rows(
    lm: DatasetDict, raw: DatasetDict, text_column: str, tokenizer: PreTrainedTokenizerBase, block_size: int
) -> None:
    for name, split in lm.items():
        if len(split) == 0:
            texts = [t for t in raw[name][text_column][:MAP_BATCH] if isinstance(t, str) and t.strip()]
            if not texts and not has_text(raw[name], text_column):
                raise UsageError(
                    f"the {name} data has no text: every row of column '{text_column}' is empty or blank; "
                    "pass data with text in it"
                )
            tokens = sum(len(d) for d in tokenize_documents(texts, tokenizer))
            raise UsageError(
                f"block size {block_size} is larger than the {name} data (~{tokens} tokens in its first "
                f"{MAP_BATCH} documents); lower --block-size or add data"
            )


def has_text(split: Dataset, column: str) -> bool:
    """Whether any row holds a non-blank string (only asked when a split produced no rows)."""
    return any(isinstance(t, str) and t.strip() for t in split[column])
