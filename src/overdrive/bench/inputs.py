"""The bench's shared inputs, built once in the parent so every system trains exactly the same thing.

One tokenizer (trained with overdrive's own BPE function unless one is given), one set of token rows (cut by
overdrive's own packing), one row order per global batch size (overdrive's `global_batch_indices`, which is
what `overdrive train` draws; HF Trainer reads the rows in that order with a sequential sampler) and one set of
initial weights (`save_pretrained`, loaded by every system with `from_pretrained`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from overdrive.bench.presets import Workload
from overdrive.errors import UsageError


@dataclass
class Prepared:
    """The files every system reads, and the model facts the FLOPs estimate needs."""

    init_dir: Path
    train_file: Path | None
    rows_dir: Path
    num_rows: int
    orders: dict[int, Path]
    data_source: str
    num_params: int
    flops_per_token: float
    vocab_size: int


def embedded_train_file(path: Path, texts: list[str], repeats: int) -> None:
    """The embedded text as JSONL, repeated so that long sequences still give every global batch its rows."""
    from overdrive.atomic import write_text

    lines = [json.dumps({"text": t}) for _ in range(repeats) for t in texts]
    write_text(path, "\n".join(lines) + "\n")


def model_vocab(model_config: str, config_vocab: int, tokenizer_len: int) -> int:
    """A preset that fixes a vocabulary (Llama 3: 128256) keeps it, so the bench has the real lm_head shape."""
    from overdrive.modeling import LLAMA_PRESETS

    if model_config in LLAMA_PRESETS and "vocab_size" not in LLAMA_PRESETS[model_config]:
        return tokenizer_len
    return max(config_vocab, tokenizer_len)


def prepare(w: Workload, work: Path, log: Callable[[str], None] = print) -> Prepared:
    """Tokenizer, token rows, row orders and the initial model: built once, saved under `work`."""
    from datasets import DatasetDict

    from overdrive.data.loader import BatchPlan, global_batch_indices
    from overdrive.data.packing import build_lm_datasets, tokenize_documents
    from overdrive.data.sources import embedded_texts, load_raw
    from overdrive.data.tokenizer import load_tokenizer, train_bpe
    from overdrive.metrics import flops_per_token
    from overdrive.modeling import build_from_config, count_parameters, preset_config
    from overdrive.train.build import seed_everything

    config = preset_config(w.model_config)  # fail on a bad model before any data work
    data_dir, init_dir = work / "data", work / "init"
    init_dir.mkdir(parents=True, exist_ok=True)
    train_file = Path(w.train_file).absolute() if w.train_file else None
    need_rows = max(w.batch_sizes)
    if w.dataset is None and train_file is None:
        texts = embedded_texts()
        tokenizer = load_tokenizer(w.tokenizer) if w.tokenizer else train_bpe(texts, w.vocab_size)
        tokens = sum(len(d) for d in tokenize_documents(texts, tokenizer))
        repeats = max(1, math.ceil(1.2 * need_rows * w.seq_len / max(tokens, 1)))
        train_file = data_dir / "train.jsonl"
        embedded_train_file(train_file, texts, repeats)
        source = f"embedded:pydoc-topics ×{repeats}"
    else:
        tokenizer = None
        source = w.dataset or str(train_file)
    raw, column, _ = load_raw(
        dataset=w.dataset,
        dataset_config=w.dataset_config,
        train_file=str(train_file) if train_file else None,
        validation_file=None,
        text_column=w.text_column,
        validation_split_percentage=0,
        seed=w.seed,
    )
    raw = DatasetDict({"train": raw["train"]})
    if tokenizer is None:
        tokenizer = (
            load_tokenizer(w.tokenizer)
            if w.tokenizer
            else train_bpe((t for t in raw["train"][column] if isinstance(t, str)), w.vocab_size)
        )
    rows = build_lm_datasets(raw, column, tokenizer, w.seq_len, "concat")["train"]
    if len(rows) < need_rows:
        raise UsageError(
            f"{source} gives {len(rows)} rows of {w.seq_len} tokens, fewer than the largest global batch "
            f"({need_rows}); add data or lower --batch-sizes/--seq-len"
        )
    rows.save_to_disk(str(data_dir / "rows"))
    orders = {}
    for g in w.batch_sizes:
        plan = BatchPlan(g, w.micro_for(g), w.nproc)
        order = [
            i
            for step in range(w.warmup_steps + w.steps)
            for i in global_batch_indices(len(rows), plan, w.seed, step)
        ]
        orders[g] = data_dir / f"order-gbs{g}.json"
        orders[g].write_text(json.dumps(order))

    seed_everything(w.seed, False)
    vocab = model_vocab(w.model_config, int(getattr(config, "vocab_size", 0) or 0), len(tokenizer))
    model = build_from_config(
        config, vocab, "sdpa", "float32"
    )  # weights do not depend on the attention kernel
    n_params, n_compute = count_parameters(model)
    model.save_pretrained(str(init_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(init_dir))
    mc = model.config
    flops = flops_per_token(n_compute, mc.num_hidden_layers, mc.hidden_size, w.seq_len)
    del model
    log(
        f"bench inputs: {len(rows)} rows of {w.seq_len} tokens from {source}; model {n_params / 1e6:.1f}M params"
    )
    return Prepared(
        init_dir, train_file, data_dir / "rows", len(rows), orders, source, n_params, flops, vocab
    )
