"""Chunking (run_clm concat) and document-aware packing."""

from __future__ import annotations

from datasets import Dataset, DatasetDict

from overdrive.data.loader import IGNORE_INDEX
from overdrive.data.packing import build_lm_datasets, chunk_concat, chunk_documents
from overdrive.data.tokenizer import train_bpe


def test_concat_cuts_stream_into_blocks_and_drops_tail() -> None:
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    out = chunk_concat(docs, block_size=4)
    assert out["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert out["labels"] == out["input_ids"]
    assert "position_ids" not in out


def test_documents_restart_positions_and_mask_first_label() -> None:
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    out = chunk_documents(docs, block_size=4)
    assert out["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    # row 0: doc A (3 tokens) then doc B starts at col 3; row 1: B continues (new segment), C starts at col 1
    assert out["position_ids"] == [[0, 1, 2, 0], [0, 0, 1, 2]]
    assert out["labels"] == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 7, 8]]


def test_no_label_crosses_a_document_boundary() -> None:
    docs = [list(range(100 * d, 100 * d + n)) for d, n in enumerate([5, 9, 3, 12, 7, 1, 8])]
    doc_of = {t: d for d, doc in enumerate(docs) for t in doc}
    out = chunk_documents(docs, block_size=8)
    for ids, labels, pos in zip(out["input_ids"], out["labels"], out["position_ids"], strict=True):
        for t in range(1, len(ids)):
            if labels[t] != IGNORE_INDEX:  # token t-1 predicts token t: same document, consecutive positions
                assert doc_of[ids[t - 1]] == doc_of[ids[t]]
                assert pos[t] == pos[t - 1] + 1
            if pos[t] == 0:
                assert labels[t] == IGNORE_INDEX


def test_build_lm_datasets_appends_eos_between_documents() -> None:
    texts = ["alpha beta gamma delta " * 5, "epsilon zeta eta theta " * 5, "iota kappa lambda mu " * 5]
    tok = train_bpe(texts * 3, vocab_size=300)
    raw = DatasetDict(
        {"train": Dataset.from_dict({"text": texts}), "validation": Dataset.from_dict({"text": texts})}
    )
    for packing in ("concat", "documents"):
        lm = build_lm_datasets(raw, "text", tok, block_size=16, packing=packing)
        flat = [t for row in lm["train"]["input_ids"] for t in row]
        assert tok.eos_token_id in flat
        assert all(len(row) == 16 for row in lm["train"]["input_ids"])
        if packing == "documents":
            assert all(row[0] == 0 for row in lm["train"]["position_ids"])
