"""The run's data: raw text -> tokenizer -> packed rows -> the batch plan and the number of steps."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from overdrive.config import TrainConfig
from overdrive.core.runtime import Runtime
from overdrive.data.instruction import (
    SplitStats,
    build_instruction_datasets,
    describe,
    ensure_chat_template,
    tokenizer_texts,
)
from overdrive.data.loader import BatchPlan, collate, global_batch_indices, rank_micro_batches
from overdrive.data.packing import build_lm_datasets
from overdrive.data.sources import load_raw
from overdrive.errors import UsageError
from overdrive.parallel import Strategy
from overdrive.train.build import main_process_first, resolve_tokenizer, share_tokenizer


@dataclass
class TrainData:
    tokenizer: PreTrainedTokenizerBase
    train_rows: Dataset
    validation: Dataset | None
    source: str
    plan: BatchPlan
    steps_per_epoch: int
    total_steps: int
    instruction: dict[str, SplitStats] | None = None  # per split, for instruction data (--data-format)

    def micro_batches(self, step: int, seed: int, dp_rank: int) -> list[dict[str, torch.Tensor]]:
        """This data-parallel rank's micro-batches of global batch `step` (the same on any layout)."""
        indices = global_batch_indices(len(self.train_rows), self.plan, seed, step)
        return [collate(self.train_rows[idx]) for idx in rank_micro_batches(indices, self.plan, dp_rank)]


RawData = tuple[DatasetDict, str, str]  # (train/validation splits, text column, a name for the source)


def read_data(cfg: TrainConfig) -> RawData:
    """Read and check the raw text: cheap next to training, so bad data fails before auto measures anything."""
    return load_raw(
        dataset=cfg.dataset,
        dataset_config=cfg.dataset_config,
        train_file=cfg.train_file,
        validation_file=cfg.validation_file,
        text_column=cfg.text_column,
        validation_split_percentage=cfg.validation_split_percentage,
        seed=cfg.seed,
        cache_dir=cfg.cache_dir,
        data_format=cfg.data_format,
    )


def prepare_data(
    cfg: TrainConfig, strategy: Strategy, runtime: Runtime, run_dir: Path | None, raw_data: RawData
) -> TrainData:
    """Tokenize and pack `raw_data` (`read_data`); `run_dir`: the run being resumed, whose saved tokenizer a
    from-scratch run must keep using."""
    raw, text_column, source = raw_data
    tokenizer, lm, stats = tokenize_data(cfg, raw, text_column, runtime, run_dir)
    train_rows = first_rows(lm["train"], cfg.max_train_samples)
    validation = first_rows(lm["validation"], cfg.max_eval_samples) if "validation" in lm else None
    micro_batch_size, _ = strategy.resolve_batch(cfg.global_batch_size, runtime.dp_size, cfg.micro_batch_size)
    steps_per_epoch = len(train_rows) // cfg.global_batch_size
    if steps_per_epoch == 0:
        raise UsageError(
            f"the training data has {len(train_rows)} rows of {cfg.block_size} tokens, fewer than one global "
            f"batch ({cfg.global_batch_size}); lower --global-batch-size or --block-size, or add data"
        )
    return TrainData(
        tokenizer=tokenizer,
        train_rows=train_rows,
        validation=validation,
        source=source,
        plan=BatchPlan(cfg.global_batch_size, micro_batch_size, runtime.dp_size),
        steps_per_epoch=steps_per_epoch,
        total_steps=cfg.max_steps or max(1, math.ceil(cfg.num_train_epochs * steps_per_epoch)),
        instruction=stats,
    )


def tokenize_data(
    cfg: TrainConfig, raw: DatasetDict, text_column: str, runtime: Runtime, run_dir: Path | None
) -> tuple[PreTrainedTokenizerBase, DatasetDict, dict[str, SplitStats] | None]:
    """The tokenizer, the packed splits and, for instruction data, what tokenising each split did."""
    instruction = cfg.data_format != "text"
    texts = tokenizer_texts(raw["train"], cfg.data_format) if instruction else raw["train"][text_column]
    own = resolve_tokenizer(cfg, texts, run_dir)
    tokenizer = share_tokenizer(own, runtime)
    tokenizer.chat_template = own.chat_template  # share_tokenizer rebuilds it on the other ranks without one
    if cfg.data_format == "chat":
        ensure_chat_template(tokenizer)
    stats = None
    with main_process_first(runtime):  # rank 0 fills the datasets cache, the others read it
        if instruction:
            lm, stats = build_instruction_datasets(
                raw, cfg.data_format, tokenizer, cfg.block_size, cfg.packing, cfg.train_on_prompt
            )
        else:
            lm = build_lm_datasets(raw, text_column, tokenizer, cfg.block_size, cfg.packing)
    if stats is not None and runtime.is_main and not cfg.quiet:
        line = describe(stats, cfg.data_format, cfg.block_size, cfg.train_on_prompt)
        print(line, file=sys.stderr, flush=True)
    return tokenizer, lm, stats


def first_rows(rows: Dataset, limit: int | None) -> Dataset:
    """--max-train-samples / --max-eval-samples: the first `limit` packed rows."""
    return rows.select(range(min(limit, len(rows)))) if limit else rows
