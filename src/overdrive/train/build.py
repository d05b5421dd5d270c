"""The pieces `train()` assembles before the first step: output dir, seeds, tokenizer, model, engine."""

from __future__ import annotations

import contextlib
import copy
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from overdrive.config import TrainConfig
from overdrive.core.engine import TrainEngine
from overdrive.core.runtime import Runtime
from overdrive.data.tokenizer import TOKENIZER_FILES, load_tokenizer, train_bpe
from overdrive.errors import UsageError
from overdrive.hub import quiet_logs, require_hub
from overdrive.modeling import check_attn, check_pretrained_source, load_pretrained, one_line, preset_config
from overdrive.parallel import Strategy, WeightFill
from overdrive.parallel.adapters import adapter_spec
from overdrive.parallel.materialize import build_meta_model, load_weights, materialize, meta_reference
from overdrive.train.neftune import apply_neftune
from overdrive.train.optim import check_optimizer, make_optimizer, make_scheduler

if TYPE_CHECKING:
    from overdrive.train.data_stage import TrainData  # data_stage imports this module


def check_model_source(cfg: TrainConfig, strategy: Strategy | None = None) -> None:
    """Fail on a bad --model / --model-config, tensor or pipeline degrees the model cannot be split by, or an
    unreachable hub id, before any data is read or process group started."""
    strategy = strategy or Strategy()
    tensor_parallel = strategy.tensor_parallel
    if cfg.model:
        check_pretrained_source(cfg.model, cfg.attn_implementation)
        config = AutoConfig.from_pretrained(cfg.model) if Path(cfg.model).is_dir() else None
    else:
        config = preset_config(cfg.model_config or "tiny")
        config.vocab_size = padded_vocab(cfg.vocab_size, tensor_parallel)
        check_attn(cfg.attn_implementation)
    from overdrive.parallel.adapters import check_adapters

    check_adapters(cfg, resolve_strategy(cfg), config)
    if config is not None and tensor_parallel > 1:
        from overdrive.parallel.tensor import check_tensor_parallel

        check_tensor_parallel(config, tensor_parallel)
    if config is not None and strategy.pipeline_parallel > 1:
        from overdrive.parallel.pipeline import check_pipeline

        n_stages = strategy.pipeline_parallel * strategy.virtual_stages
        check_pipeline(config, n_stages, strategy.pipeline_split)
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


def build_model(
    cfg: TrainConfig, vocab_size: int, runtime: Runtime
) -> tuple[PreTrainedModel, WeightFill | None]:
    """The model on the meta device and the function that fills its local shards once it is parallelized.

    From a config the weights are initialised per module from (seed, module name), so every layout starts
    from the same full model; `--model` (a local directory, or a hub id downloaded first) streams its
    safetensors into the shards. A tokenizer larger than the checkpoint's vocabulary (the embeddings grow)
    loads the full model instead.
    """
    if cfg.model:
        weights_dir = local_weights_dir(cfg.model, cfg.cache_dir)
        config = AutoConfig.from_pretrained(weights_dir, trust_remote_code=cfg.trust_remote_code)
        if config.vocab_size < vocab_size:
            model = load_pretrained(
                cfg.model, cfg.attn_implementation, cfg.dtype, cfg.trust_remote_code, cfg.cache_dir
            )
            if model.get_input_embeddings().weight.shape[0] < vocab_size:
                model.resize_token_embeddings(vocab_size)
            return model, None
        model = build_meta_model(config, cfg.attn_implementation, cfg.dtype)
        reference = meta_reference(model)
        return model, lambda m: load_weights(m, reference, weights_dir, runtime.device)
    config = preset_config(cfg.model_config or "tiny")
    vocab_size = padded_vocab(vocab_size, runtime.dims.tp)
    model = build_meta_model(config, cfg.attn_implementation, cfg.dtype, vocab_size)
    reference = meta_reference(model)
    return model, lambda m: materialize(m, reference, seed=cfg.seed, device=runtime.device)


def local_weights_dir(model: str, cache_dir: str | None) -> str:
    """A local directory with the model's config and safetensors: `model` itself, or its hub snapshot."""
    if Path(model).is_dir():
        return model
    from huggingface_hub import snapshot_download

    try:
        with quiet_logs():
            return snapshot_download(model, allow_patterns=["*.json", "*.safetensors"], cache_dir=cache_dir)
    except Exception as exc:  # the hub client raises many kinds (offline, not found, gated)
        raise UsageError(
            f"could not download model {model!r}: {one_line(exc)}; pass a local directory"
        ) from None


def padded_vocab(vocab_size: int, tensor_parallel: int) -> int:
    """A from-scratch model's vocabulary, rounded up so the embedding splits over the tensor-parallel ranks."""
    return -(-vocab_size // tensor_parallel) * tensor_parallel


def resolve_strategy(cfg: TrainConfig, chosen: Strategy | None = None) -> Strategy:
    """--strategy (preset or YAML; `chosen` is what --strategy auto chose, and auto alone stands for the
    single-process layout); --[no-]activation-checkpointing, --[no-]compile, --[no-]kernels override it."""
    if chosen is not None:
        strategy = copy.deepcopy(chosen)
    else:
        strategy = Strategy.from_name_or_path(None if cfg.strategy == "auto" else cfg.strategy)
    if cfg.activation_checkpointing is not None:
        on = strategy.activation_checkpointing if strategy.activation_checkpointing != "none" else "full"
        strategy.activation_checkpointing = on if cfg.activation_checkpointing else "none"
        if not cfg.activation_checkpointing:
            strategy.ac_every = 1
    if cfg.compile is not None:
        strategy.compile = cfg.compile
    if cfg.kernels is not None:
        strategy.kernels = cfg.kernels
    return strategy


def build_engine(
    model: PreTrainedModel,
    cfg: TrainConfig,
    strategy: Strategy,
    runtime: Runtime,
    data: TrainData,
    fill: WeightFill | None = None,
) -> TrainEngine:
    """The model parallelized for the strategy behind the engine protocol, with the run's optimizer."""
    from overdrive.parallel import build_engine as build_parallel_engine

    check_optimizer(cfg, strategy)
    scaler = torch.amp.GradScaler(runtime.device.type) if cfg.precision == "fp16" else None
    engine = build_parallel_engine(
        model,
        strategy,
        runtime,
        lambda m: make_optimizer(m, cfg),
        lambda opt: make_scheduler(opt, cfg, data.total_steps),
        cfg.max_grad_norm,
        cfg.precision,
        micro_batch_size=data.plan.micro_batch_size,
        accumulation_steps=data.plan.accumulation_steps,
        grad_scaler=scaler,
        fill=fill,
        adapters=adapter_spec(cfg),
    )
    # after the layout's own hooks; pipeline stages are copies of the model, the first one embeds
    for module in getattr(engine, "stages", None) or [engine.unwrapped_model()]:
        apply_neftune(module, cfg.neftune_noise_alpha)
    return engine


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
