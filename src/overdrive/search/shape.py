"""The few numbers of a decoder-only transformer that memory and time depend on, read from an HF config.

Why not the model: `overdrive plan` must answer in seconds for llama3-8b on a laptop, so every quantity is a
formula of the config (the tests check the parameter count against a model built on `meta`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """hidden, intermediate, heads, kv heads, head dim, layers, vocabulary, tied embeddings, biases."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    tied: bool
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        return cls(
            hidden=hidden,
            intermediate=int(config.intermediate_size),
            heads=heads,
            kv_heads=int(kv),
            head_dim=int(head_dim),
            layers=int(config.num_hidden_layers),
            vocab=int(config.vocab_size),
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
        )

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_matmul_params(self) -> int:
        """q, k, v, o projections and the gated MLP (the tensors tensor parallelism splits)."""
        h, i = self.hidden, self.intermediate
        attn = h * (self.q_dim + 2 * self.kv_dim) + self.q_dim * h
        bias = (self.q_dim + 2 * self.kv_dim + h) * self.attention_bias + (2 * i + h) * self.mlp_bias
        return attn + 3 * h * i + bias

    def lora_params_per_layer(self, rank: int) -> int:
        """A (in x r) and B (r x out) of each of the seven decoder matmuls, peft's all-linear targets."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        return rank * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h))

    def lora_params(self, rank: int) -> int:
        """Adapter parameters of the whole model (every decoder layer)."""
        return self.layers * self.lora_params_per_layer(rank)

    def layer_params(self) -> int:
        return self.layer_matmul_params() + 2 * self.hidden  # + two RMSNorm weights

    def embed_params(self) -> int:
        return self.vocab * self.hidden

    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    def total_params(self) -> int:
        return self.embed_params() + self.head_params() + self.layers * self.layer_params() + self.hidden

    def non_embedding_params(self) -> int:
        """N of the 6·N FLOPs rule: everything but the input embedding (a tied lm_head still computes)."""
        return self.layers * self.layer_params() + self.hidden + self.vocab * self.hidden

    def param_tensors_per_layer(self) -> list[int]:
        """Element counts of one decoder layer's parameter tensors (DeepSpeed decides per tensor)."""
        h, i = self.hidden, self.intermediate
        sizes = [h * self.q_dim, h * self.kv_dim, h * self.kv_dim, self.q_dim * h, h * i, h * i, i * h, h, h]
        if self.attention_bias:
            sizes += [self.q_dim, self.kv_dim, self.kv_dim, h]
        if self.mlp_bias:
            sizes += [i, i, h]
        return sizes
