"""Model presets and loading: fine-tune from a checkpoint (safetensors only) or build from a config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from overdrive.errors import UsageError
from overdrive.hub import quiet_logs, require_hub

# From-scratch presets. vocab_size is replaced by the tokenizer's size at build time.
LLAMA_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
    "llama3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        vocab_size=128256,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        vocab_size=128256,
    ),
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        vocab_size=32000,
    ),
}

COMMON_CAUSAL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "gpt_neox", "olmo2")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def preset_config(name_or_path: str) -> PretrainedConfig:
    """A preset name, a config.json file, or a directory holding one; only causal-LM model types pass."""
    if name_or_path in LLAMA_PRESETS:
        from transformers import LlamaConfig

        return LlamaConfig(**LLAMA_PRESETS[name_or_path])
    p = Path(name_or_path)
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        check_config_file(p)
        try:
            config = AutoConfig.from_pretrained(str(p))
        except (ValueError, KeyError, OSError) as exc:
            raise UsageError(f"{p} is not a usable HF config.json ({one_line(exc)}); fix the file") from None
        check_causal_lm(config.model_type, bool(getattr(config, "is_decoder", False)), str(p))
        return config
    presets = ", ".join(LLAMA_PRESETS)
    raise UsageError(f"unknown model config {name_or_path!r}; use a preset ({presets}) or a config.json path")


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_causal_lm(model_type: str | None, is_decoder: bool, where: str, auto_map: object = None) -> None:
    """Refuse model types transformers cannot build as a causal LM, before any data is read.

    Masked-LM encoders (BERT, RoBERTa) are in transformers' causal-LM mapping too, but attend to the future
    unless the config says `is_decoder`: trained as they stand they learn to copy the next token, so they need it.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    if isinstance(auto_map, dict) and "AutoModelForCausalLM" in auto_map:
        return  # custom code that declares a causal LM (needs --trust-remote-code to load)
    works = (
        f"use a decoder-only model type such as {', '.join(COMMON_CAUSAL_TYPES)} "
        "(any model type in transformers' causal-LM mapping works)"
    )
    if not model_type:
        raise UsageError(f'{where} has no model_type; add one (e.g. "model_type": "llama") or {works}')
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        seq2seq = model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
        kind = (
            "an encoder-decoder model, not a causal language model"
            if seq2seq
            else "not a causal language model"
        )
        raise UsageError(f"{where} is a {model_type!r} config, {kind}; {works}")
    # encoder-decoder types (BART) build their causal LM from the decoder stack, which is causal by itself
    bidirectional = (
        model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        and model_type not in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    )
    if bidirectional and not is_decoder:
        raise UsageError(
            f"{where} is a {model_type!r} config, an encoder that sees the whole sequence, not a causal language "
            f'model; set "is_decoder": true in it to train it as a decoder, or {works}'
        )


def build_from_config(
    config: PretrainedConfig, vocab_size: int, attn_implementation: str, dtype: str
) -> PreTrainedModel:
    config.vocab_size = vocab_size
    config.use_cache = False
    check_attn(attn_implementation)
    config._attn_implementation = attn_implementation
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    if dtype not in ("auto", "float32"):
        model = model.to(DTYPES[dtype])
    return model


def check_attn(attn_implementation: str) -> None:
    if attn_implementation == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
            raise UsageError(
                "--attn-implementation flash_attention_2 needs CUDA and the flash-attn package; "
                "use sdpa (the default) or `pip install flash-attn` on a GPU machine"
            )


def load_pretrained(
    name_or_path: str,
    attn_implementation: str,
    dtype: str,
    trust_remote_code: bool,
    cache_dir: str | None = None,
) -> PreTrainedModel:
    """Fine-tuning start point. Only safetensors weights are accepted: pickle files can run code."""
    check_pretrained_source(name_or_path, attn_implementation)
    try:
        with quiet_logs():
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path,
                use_safetensors=True,
                trust_remote_code=trust_remote_code,
                attn_implementation=attn_implementation,
                dtype=DTYPES[dtype],
                cache_dir=cache_dir,
            )
    except (OSError, ValueError) as exc:
        raise UsageError(f"could not load model {name_or_path!r}: {one_line(exc)}") from None
    model.config.use_cache = False
    return model


def check_pretrained_source(name_or_path: str, attn_implementation: str) -> None:
    """Cheap checks of a fine-tuning source, run before any data is loaded."""
    check_attn(attn_implementation)
    p = Path(name_or_path)
    if not p.exists():
        require_hub(name_or_path, "--model", cached_files=("config.json",))
        return
    if not p.is_dir():
        raise UsageError(f"--model {p} is a file; pass the directory holding config.json and *.safetensors")
    if not (p / "config.json").is_file():
        raise UsageError(f"{p} has no config.json; pass a directory written by save_pretrained")
    check_config_file(p / "config.json")
    if not any(p.glob("*.safetensors")):
        if any(p.glob("*.bin")) or any(p.glob("*.pt")) or any(p.glob("*.pth")):
            raise UsageError(
                f"{p} holds only pickle weights (.bin/.pt), which overdrive does not load; convert them to "
                "safetensors (load once in a trusted session and save_pretrained(safe_serialization=True))"
            )
        raise UsageError(f"{p} has no *.safetensors weights; pass a directory written by save_pretrained")


def check_config_file(path: Path) -> None:
    """A model directory's config.json must be a JSON object naming a causal-LM model type."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path} is not a readable JSON file ({one_line(exc)}); fix the file") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path} holds a JSON {type(config).__name__}, not an object; fix the file")
    check_causal_lm(
        config.get("model_type"), bool(config.get("is_decoder", False)), str(path), config.get("auto_map")
    )


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, non-embedding parameters): the second drives the FLOPs estimate."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb = embedding.weight.numel() if embedding is not None else 0
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    # A tied lm_head still costs its matmul: count it as compute, not as an embedding lookup.
    non_embedding = total - emb + (emb if tied else 0)
    return total, non_embedding
