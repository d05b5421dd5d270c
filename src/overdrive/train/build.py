"""The pieces `train()` assembles before the first step: output dir, seeds, tokenizer, model, engine."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from overdrive.config import TrainConfig
from overdrive.data.tokenizer import TOKENIZER_FILES, load_tokenizer, train_bpe
from overdrive.hub import require_hub
from overdrive.modeling import (
    build_from_config,
    check_attn,
    check_pretrained_source,
    load_pretrained,
    preset_config,
)
from overdrive.parallel import Strategy
from overdrive.train.engine import Runtime, TrainEngine
from overdrive.train.optim import make_optimizer, make_scheduler


def check_model_source(cfg: TrainConfig) -> None:
    """Fail on a bad --model / --model-config, or an unreachable hub id, before any data is read."""
    if cfg.model:
        check_pretrained_source(cfg.model, cfg.attn_implementation)
    else:
        preset_config(cfg.model_config or "tiny")
        check_attn(cfg.attn_implementation)
    if cfg.tokenizer:
        require_hub(cfg.tokenizer, "--tokenizer", cached_files=TOKENIZER_FILES)
    if cfg.dataset:
        require_hub(cfg.dataset, "--dataset", cached_files=None)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def resolve_tokenizer(
    cfg: TrainConfig, train_texts: Sequence[str], run_dir: Path | None
) -> PreTrainedTokenizerBase:
    """--tokenizer, else the model's, else (from scratch) the run's saved one on resume, else train a BPE."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer, cfg.trust_remote_code, "--tokenizer", cfg.cache_dir)
    if cfg.model:
        return load_tokenizer(cfg.model, cfg.trust_remote_code, "--model", cfg.cache_dir)
    if run_dir is not None and (run_dir / "tokenizer").is_dir():
        return load_tokenizer(str(run_dir / "tokenizer"))
    return train_bpe((t for t in train_texts if isinstance(t, str)), cfg.vocab_size)


def build_model(cfg: TrainConfig, vocab_size: int) -> PreTrainedModel:
    if cfg.model:
        model = load_pretrained(
            cfg.model, cfg.attn_implementation, cfg.dtype, cfg.trust_remote_code, cfg.cache_dir
        )
        if model.get_input_embeddings().weight.shape[0] < vocab_size:
            model.resize_token_embeddings(vocab_size)
    else:
        model = build_from_config(
            preset_config(cfg.model_config or "tiny"), vocab_size, cfg.attn_implementation, cfg.dtype
        )
    return model


def resolve_strategy(cfg: TrainConfig) -> Strategy:
    """--strategy (preset or YAML), with the run's --activation-checkpointing/--compile/--kernels switched on."""
    strategy = Strategy.from_name_or_path(cfg.strategy)
    if cfg.activation_checkpointing and strategy.activation_checkpointing == "none":
        strategy.activation_checkpointing = "full"
    strategy.compile = strategy.compile or cfg.compile
    strategy.kernels = strategy.kernels or cfg.kernels
    return strategy


def build_engine(
    model: PreTrainedModel, cfg: TrainConfig, strategy: Strategy, runtime: Runtime, total_steps: int
) -> TrainEngine:
    """Model transforms in their fixed order (kernels, recompute, compile), then the strategy's engine."""
    from overdrive.parallel import build_engine as build_parallel_engine

    scaler = torch.amp.GradScaler(runtime.device.type) if cfg.precision == "fp16" else None
    return build_parallel_engine(
        model,
        strategy,
        runtime,
        lambda m: make_optimizer(m, cfg),
        lambda opt: make_scheduler(opt, cfg, total_steps),
        cfg.max_grad_norm,
        cfg.precision,
        micro_batch_size=cfg.micro_batch_size,
        grad_scaler=scaler,
    )


def share_tokenizer(tokenizer: PreTrainedTokenizerBase, runtime: Runtime) -> PreTrainedTokenizerBase:
    """Every rank must use rank 0's tokenizer: a BPE trained on each rank separately could differ."""
    if runtime.world_size == 1 or not isinstance(tokenizer, PreTrainedTokenizerFast):
        return tokenizer
    import torch.distributed as dist

    payload = [tokenizer.backend_tokenizer.to_str() if runtime.is_main else None]
    dist.broadcast_object_list(payload, src=0)
    if runtime.is_main:
        return tokenizer
    from tokenizers import Tokenizer

    special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(payload[0]), **special)


@contextlib.contextmanager
def main_process_first(runtime: Runtime) -> Iterator[None]:
    """Rank 0 runs the block first (filling caches); the other ranks follow once it is done."""
    if not runtime.is_main:
        runtime.barrier()
    yield
    if runtime.is_main:
        runtime.barrier()


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[None]:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
