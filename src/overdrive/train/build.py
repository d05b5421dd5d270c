"""The pieces `train()` assembles before the first step: output dir, seeds, tokenizer, model, engine."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from overdrive.config import TrainConfig
from overdrive.data.tokenizer import load_tokenizer, train_bpe
from overdrive.errors import UsageError
from overdrive.modeling import (
    build_from_config,
    check_attn,
    check_pretrained_source,
    load_pretrained,
    preset_config,
)
from overdrive.train import checkpoint
from overdrive.train.engine import LocalEngine, Runtime, TrainEngine
from overdrive.train.optim import make_optimizer, make_scheduler

RUN_ARTIFACTS = (
    "checkpoints",
    "final",
    "tokenizer",
    "metrics.jsonl",
    "summary.json",
    "curves.png",
    "sample.txt",
    "config.yaml",
)


def plan_output(cfg: TrainConfig) -> tuple[Path, Path | None]:
    """Decide the output dir and the checkpoint to resume from, refusing to clobber an existing run."""
    if cfg.resume and cfg.resume != "latest" and cfg.output_dir is None:
        resume_from = checkpoint.resolve_resume(cfg.resume, None)
        return checkpoint.run_dir_of(resume_from), resume_from
    output_dir = (
        Path(cfg.output_dir) if cfg.output_dir else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    )
    if cfg.resume:
        return output_dir, checkpoint.resolve_resume(cfg.resume, output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"output dir {output_dir} is a file; pass a directory to --output-dir")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not cfg.overwrite:
        raise UsageError(
            f"output dir {output_dir} already exists and is not empty; pass --overwrite to replace the run, "
            "--resume latest to continue it, or another --output-dir"
        )
    return output_dir, None


def check_model_source(cfg: TrainConfig) -> None:
    """Fail on a bad --model / --model-config before any data is read or tokenizer trained."""
    if cfg.model:
        check_pretrained_source(cfg.model, cfg.attn_implementation)
    else:
        preset_config(cfg.model_config or "tiny")
        check_attn(cfg.attn_implementation)


def clear_run(output_dir: Path) -> None:
    """With --overwrite, remove what an earlier run wrote (and nothing else the user keeps there)."""
    for name in RUN_ARTIFACTS:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


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
        return load_tokenizer(cfg.tokenizer, cfg.trust_remote_code)
    if cfg.model:
        return load_tokenizer(cfg.model, cfg.trust_remote_code)
    if run_dir is not None and (run_dir / "tokenizer").is_dir():
        return load_tokenizer(str(run_dir / "tokenizer"))
    return train_bpe((t for t in train_texts if isinstance(t, str)), cfg.vocab_size)


def build_model(cfg: TrainConfig, vocab_size: int) -> PreTrainedModel:
    if cfg.model:
        model = load_pretrained(cfg.model, cfg.attn_implementation, cfg.dtype, cfg.trust_remote_code)
        if model.get_input_embeddings().weight.shape[0] < vocab_size:
            model.resize_token_embeddings(vocab_size)
    else:
        model = build_from_config(
            preset_config(cfg.model_config or "tiny"), vocab_size, cfg.attn_implementation, cfg.dtype
        )
    if cfg.kernels:
        from overdrive.patches import patch_model

        patch_model(model)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        from overdrive.kernels.compile import compile_regions

        compile_regions(model)
    return model


def build_engine(model: PreTrainedModel, cfg: TrainConfig, runtime: Runtime, total_steps: int) -> TrainEngine:
    scaler = torch.amp.GradScaler(runtime.device.type) if cfg.precision == "fp16" else None
    return LocalEngine(
        model,
        lambda m: make_optimizer(m, cfg),
        lambda opt: make_scheduler(opt, cfg, total_steps),
        runtime,
        grad_scaler=scaler,
    )


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[None]:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
