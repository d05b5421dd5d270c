"""Tiny config-built models shared by the patch tests (no hub access needed)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def tiny_config(model_type: str, attn: str = "sdpa", **overrides: object):
    kw: dict[str, object] = dict(
        vocab_size=509,  # odd on purpose: not a multiple of 8
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    if model_type == "qwen3":
        kw["head_dim"] = 16
    kw.update(overrides)
    cfg = AutoConfig.for_model(model_type, **kw)
    cfg._attn_implementation = attn
    return cfg


def tiny_model(model_type: str, seed: int = 0, attn: str = "sdpa", **overrides: object) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config(model_type, attn, **overrides), attn_implementation=attn
    )
    return model.float()
