"""Causal-LM head patch: the loss is computed by the fused linear+CE kernel, without logits.

Applies to HF ``*ForCausalLM`` classes whose forward is the standard
``hidden = self.model(...).last_hidden_state; logits = self.lm_head(hidden); loss = self.loss_function(...)``
(verified by :func:`check_causal_lm_class` before patching).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import can_return_tuple

from overdrive.kernels.attention import document_starts, flash_varlen_kwargs, uses_varlen_kwargs
from overdrive.kernels.fused_linear_cross_entropy import fused_causal_lm_loss
from overdrive.kernels.vocab_parallel_cross_entropy import (
    is_vocab_parallel_head,
    vocab_parallel_fused_causal_lm_loss,
)

FUSED_CE_FLAG = "_overdrive_fused_ce"
_EXPECTED_PARAMS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "past_key_values",
    "inputs_embeds",
    "labels",
    "use_cache",
    "logits_to_keep",
)
_WARNED: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, stacklevel=3)


def check_causal_lm_class(cls: type) -> str | None:
    """None if ``cls.forward`` has the structure the patch re-implements, else the reason it does not."""
    fwd = cls.forward
    try:
        params = inspect.signature(fwd).parameters
    except (TypeError, ValueError):
        return f"cannot inspect {cls.__name__}.forward"
    missing = [p for p in _EXPECTED_PARAMS if p not in params]
    if missing:
        return f"{cls.__name__}.forward lacks parameters {missing}"
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return f"{cls.__name__}.forward takes no **kwargs (num_items_in_batch would be dropped)"
    names = set(inspect.unwrap(fwd).__code__.co_names)
    needed = {"model", "lm_head", "loss_function"}
    if not needed <= names:
        return f"{cls.__name__}.forward does not use {sorted(needed - names)}; its loss path is non-standard"
    return None


def _fused_ce_usable(model: nn.Module, logits_to_keep: Any) -> bool:
    if not getattr(model, FUSED_CE_FLAG, False) or not model.training or not torch.is_grad_enabled():
        return False  # eval/generation: callers expect logits
    if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        return False
    if is_vocab_parallel_head(getattr(model, "lm_head", None)):  # tensor parallel: its own loss_function
        return model.lm_head.bias is None
    if "_loss_function" in model.__dict__:  # user installed a custom loss: respect it
        return False
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear:  # e.g. PEFT-wrapped lm_head: the wrapper's forward must run
        _warn_once(
            f"head:{type(head).__name__}",
            f"overdrive: lm_head is {type(head).__name__}, not nn.Linear; using HF's loss (logits materialised).",
        )
        return False
    w = head.weight
    if type(w) not in (nn.Parameter, torch.Tensor) or hasattr(w, "ds_id") or w.numel() == 0:
        _warn_once(
            "head:sharded",
            "overdrive: lm_head weight is sharded/partitioned (FSDP DTensor or ZeRO-3); "
            "using HF's loss (logits materialised).",
        )
        return False
    return True


def _maybe_varlen_kwargs(
    model: nn.Module,
    attention_mask: Any,
    position_ids: torch.Tensor | None,
    past_key_values: Any,
    kwargs: dict[str, Any],
) -> None:
    """Give flash/varlen attention the document boundaries of packed rows (any batch size)."""
    if (
        position_ids is None
        or attention_mask is not None
        or past_key_values is not None
        or "cu_seq_lens_q" in kwargs
        or position_ids.shape[-1] < 2
        or not uses_varlen_kwargs(model.config)
    ):
        return
    starts = document_starts(position_ids)
    if int(starts.sum()) > starts.shape[0]:  # at least one row holds several documents
        kwargs.update(flash_varlen_kwargs(position_ids))


def _packing_safe_use_cache(
    model: nn.Module,
    use_cache: bool | None,
    attention_mask: Any,
    position_ids: torch.Tensor | None,
    past_key_values: Any,
) -> bool | None:
    """Turn the implicit KV cache off where it would break packed-sequence masking.

    HF models default ``use_cache`` to ``config.use_cache`` (True) even in training, so the base
    model creates an empty ``DynamicCache``; ``masking_utils`` only detects packed rows when
    ``past_key_values is None``, so packed documents silently attend to each other. A cache is
    useless in a training forward (and costs memory), so training disables it unless asked for
    explicitly; in eval it is disabled only when the rows really are packed.
    """
    if use_cache is not None or past_key_values is not None:
        return use_cache
    if model.training:
        return False
    if position_ids is not None and attention_mask is None and position_ids.shape[-1] > 1:
        starts = document_starts(position_ids)
        if int(starts.sum()) > starts.shape[0]:
            return False
    return use_cache


class CausalLMPatch:
    """Mixin over ``*ForCausalLM``: training forward with labels computes the loss without logits."""

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        use_cache = _packing_safe_use_cache(self, use_cache, attention_mask, position_ids, past_key_values)  # type: ignore[arg-type]
        _maybe_varlen_kwargs(self, attention_mask, position_ids, past_key_values, kwargs)  # type: ignore[arg-type]
        has_targets = labels is not None or kwargs.get("shift_labels") is not None
        if not (has_targets and _fused_ce_usable(self, logits_to_keep)):  # type: ignore[arg-type]
            return super().forward(  # type: ignore[misc]
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        outputs = self.model(  # type: ignore[attr-defined]
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        vocab_parallel = is_vocab_parallel_head(self.lm_head)  # type: ignore[attr-defined]
        loss = (vocab_parallel_fused_causal_lm_loss if vocab_parallel else fused_causal_lm_loss)(
            outputs.last_hidden_state,
            self.lm_head,  # type: ignore[attr-defined]
            labels,
            shift_labels=kwargs.get("shift_labels"),
            num_items_in_batch=kwargs.get("num_items_in_batch"),
            ignore_index=kwargs.get("ignore_index", -100),
        )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=None,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
