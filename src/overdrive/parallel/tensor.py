"""Tensor parallelism (Megatron-style, on DTensor) for HF causal LMs, with optional sequence parallelism.

Why this layout: the attention and MLP projections split by heads / intermediate columns (colwise in,
rowwise out: one all-reduce, or reduce-scatter, per block), the embedding and lm_head split the vocabulary
so neither the `[vocab × hidden]` weights nor the `[tokens × vocab]` logits exist whole on any rank, and the
loss runs on the vocab-sharded logits under `loss_parallel` (no gather). With sequence parallelism the
residual stream and the norms are sharded on the sequence dimension between blocks.

Layout of one Llama-family model (Llama, Mistral, Qwen2, Qwen3), `S` = sequence parallel on:

    embed_tokens    vocab-parallel (weight Shard(0)), partial lookups summed into the residual stream
    residual stream a DTensor between modules: Replicate, or Shard(1) (sequence) under S
    q/k/v, gate/up  colwise (weight Shard(0)): each rank holds whole heads / a slice of the MLP
    o, down         rowwise (weight Shard(1)): all-reduced, or reduce-scattered under S, into the stream
    norms           replicated weights, run on plain local tensors (the rank's sequence shard under S)
    q_norm, k_norm  (Qwen3) replicated, applied to the local heads; weight gradients summed over TP
    lm_head         colwise, output a DTensor Shard(-1) (vocab-sharded logits) for loss_parallel

A DTensor stream means HF code that reads `inputs_embeds.shape` (position ids, the causal mask) sees the
global shape. Attention and MLP get plain full-sequence tensors: attention sees `heads / tp` local heads
(transformers 5 reshapes with `-1` heads, and the GQA ratio is unchanged). Modules run on plain tensors
everywhere, so overdrive's kernels patched in before TP keep working.

Tied embeddings share one weight: both modules shard it `Shard(0)` on the vocabulary, and the tie is
restored after sharding, so both gradients accumulate into the same DTensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from overdrive.errors import UsageError
from overdrive.kernels.vocab_parallel_cross_entropy import VOCAB_PARALLEL_ATTR, is_vocab_parallel_head

#: model_type -> whether attention has per-head q_norm / k_norm (Qwen3).
LLAMA_FAMILY: dict[str, bool] = {"llama": False, "mistral": False, "qwen2": False, "qwen3": True}
#: transformers' plan strings this module translates for other architectures (`base_model_tp_plan`).
GENERIC_STYLES = ("colwise", "rowwise", "replicated_with_grad_allreduce")
_PARTIAL_GRAD_ATTR = "_overdrive_tp_partial_grads"


# ---------------------------------------------------------------------------------------------- checks
def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def check_tensor_parallel(config: Any, tp: int) -> None:
    """Refuse, in one line, a tensor degree the model cannot be split by (no process group needed)."""
    if tp < 1:
        raise UsageError(f"tensor_parallel must be >= 1, got {tp}")
    if tp == 1:
        return
    cfg = _text_config(config)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in LLAMA_FAMILY and not getattr(cfg, "base_model_tp_plan", None):
        raise UsageError(
            f"tensor parallelism supports Llama, Mistral, Qwen2 and Qwen3 models and configs with a "
            f"base_model_tp_plan; model_type {model_type!r} has none: set tensor_parallel: 1"
        )
    if model_type not in LLAMA_FAMILY:
        _check_generic_plan(cfg.base_model_tp_plan, model_type)
    heads = getattr(cfg, "num_attention_heads", None)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    for what, value, fix in (
        ("attention heads", heads, "a tensor degree that divides it"),
        ("key/value heads", kv_heads, "a tensor degree that divides it"),
        ("intermediate_size", getattr(cfg, "intermediate_size", None), "a tensor degree that divides it"),
        (
            "vocab_size",
            getattr(cfg, "vocab_size", None),
            f"--vocab-size a multiple of {tp}, or another degree",
        ),
    ):
        if isinstance(value, int) and value % tp:
            raise UsageError(f"tensor_parallel {tp} does not divide the model's {value} {what}; use {fix}")


def _check_generic_plan(plan: dict[str, str], model_type: Any) -> None:
    unknown = sorted({style for style in plan.values() if style not in GENERIC_STYLES})
    if unknown:
        raise UsageError(
            f"model_type {model_type!r}: its base_model_tp_plan uses {', '.join(unknown)}, which overdrive "
            f"cannot apply (only {', '.join(GENERIC_STYLES)}); set tensor_parallel: 1"
        )


# ---------------------------------------------------------------------------------------------- styles
def _reduce_partial_grad(param: torch.Tensor) -> None:
    """Turn a replicated parameter's partial gradient into the replicated sum once it is accumulated.

    DTensor would treat a `Partial` gradient correctly, but code that reads `grad.to_local()` (norm logging,
    finiteness checks) would see one rank's share; normalising removes that trap for one small all-reduce.
    """
    from torch.distributed.tensor import DTensor

    grad = param.grad
    if isinstance(grad, DTensor) and isinstance(param, DTensor) and grad.placements != param.placements:
        param.grad = grad.redistribute(placements=param.placements)


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= max(size, 1)
    return tuple(reversed(stride))


def _hook_partial_grads(model: nn.Module, *args: Any) -> None:
    """Root pre-forward hook: every weight read with partial gradients has `_reduce_partial_grad` hooked.

    Checked at each forward (a dict lookup per norm) rather than once, because materialising a meta
    model (`to_empty`) swaps the parameters' contents, hooks included.
    """
    for module in model.modules():
        if not module.__dict__.get(_PARTIAL_GRAD_ATTR):
            continue
        for param in module._parameters.values():
            if param is None or not param.requires_grad:
                continue
            hooks = getattr(param, "_post_accumulate_grad_hooks", None) or {}
            if not any(h is _reduce_partial_grad for h in hooks.values()):
                param.register_post_accumulate_grad_hook(_reduce_partial_grad)


def _local_replicated_style() -> type:
    """The `LocalReplicated` class, built on first use (torch.distributed imports stay lazy)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ParallelStyle

    class LocalReplicated(ParallelStyle):
        """Weights replicated over TP; the module's own forward runs on plain local tensors.

        `stream` is the placement of the DTensor residual stream the module reads and writes: `Shard(1)`
        for the norms under sequence parallelism (each rank normalises its sequence shard), `Replicate()`
        for the norms without it, None for a plain input of TP-local features (Qwen3's per-head
        q_norm/k_norm see only this rank's heads). For the call, the DTensor weights are swapped for
        `to_local(grad_placements=...)` views, partial where a rank sees only part of the activations, so the
        ranks' gradient shares are summed; the module's forward, or a kernel patched into it, never meets a
        DTensor. Outside the call (FSDP, state dicts, optimizers) the parameters are the DTensors.
        """

        def __init__(self, stream: Any = None) -> None:
            self.stream = stream
            partial = stream is None or isinstance(stream, Shard)
            self.grad_placements = (Partial(),) if partial else (Replicate(),)

        def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
            for name, param in list(module.named_parameters(recurse=False)):
                full = distribute_tensor(
                    param.detach(), device_mesh, [Replicate()], src_data_rank=self.src_data_rank
                )
                module.register_parameter(name, nn.Parameter(full, requires_grad=param.requires_grad))
            module.__dict__[_PARTIAL_GRAD_ATTR] = self.grad_placements[0].is_partial()
            module.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
            module.register_forward_hook(self._post_forward(device_mesh), always_call=True)
            return module

        def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            swapped = {n: p for n, p in module._parameters.items() if isinstance(p, DTensor)}
            for name, param in swapped.items():
                module._parameters[name] = param.to_local(grad_placements=self.grad_placements)
            x, shape = args[0], None
            if self.stream is not None:
                if x.placements != (self.stream,):
                    x = x.redistribute(placements=(self.stream,))
                shape, x = tuple(x.shape), x.to_local()
            module.__dict__["_overdrive_tp_call"] = (swapped, shape)
            return (x, *args[1:]), kwargs

        def _post_forward(self, device_mesh: Any) -> Any:
            def hook(module: nn.Module, args: tuple, output: Any) -> Any:
                swapped, shape = module.__dict__.pop("_overdrive_tp_call", ({}, None))
                module._parameters.update(swapped)
                if shape is None or not isinstance(output, torch.Tensor):
                    return output
                # the global shape is given: uneven sequence shards (1 token while generating) are fine
                stride = _contiguous_stride(shape)
                return DTensor.from_local(
                    output, device_mesh, [self.stream], run_check=False, shape=shape, stride=stride
                )

            return hook

    return LocalReplicated


def local_replicated(stream: Any = None) -> Any:
    """A `LocalReplicated` parallel style (see `_local_replicated_style`)."""
    return _local_replicated_style()(stream)


# ---------------------------------------------------------------------------------------------- plans
def _base_model(model: nn.Module) -> tuple[str, nn.Module]:
    prefix = getattr(model, "base_model_prefix", "") or ""
    base = getattr(model, prefix, None) if prefix else None
    if not isinstance(base, nn.Module):
        raise UsageError(f"{type(model).__name__} has no base model {prefix!r}; tensor parallelism needs one")
    return prefix, base


def _require(model: nn.Module, plan: dict[str, Any]) -> None:
    """Every planned module exists, and the projections are nn.Linear (else the structure is not Llama's)."""
    modules = dict(model.named_modules())
    for name, style in plan.items():
        linear = type(style).__name__ in ("ColwiseParallel", "RowwiseParallel")
        if not isinstance(modules.get(name), nn.Linear if linear else nn.Module):
            raise UsageError(
                f"{type(model).__name__} has no {'nn.Linear' if linear else 'module'} {name!r}: its structure "
                f"is not the Llama-family one tensor parallelism expects; set tensor_parallel: 1"
            )


def _stream(sp: bool) -> Any:
    """Placement of the residual stream between TP blocks: sequence-sharded under SP, else replicated.

    It stays a DTensor in both cases, so HF code that reads `inputs_embeds.shape` (position ids, the
    causal mask) sees the global shape, and torch.compile of a block sees DTensor boundaries.
    """
    from torch.distributed.tensor import Replicate, Shard

    return Shard(1) if sp else Replicate()


def _pipeline_stage(model: nn.Module, model_type: Any) -> bool:
    from overdrive.parallel.pipeline import is_stage

    if not is_stage(model):
        return False
    if model_type not in LLAMA_FAMILY:
        raise UsageError(
            f"pipeline × tensor parallelism supports the Llama family (llama, mistral, qwen2, qwen3), not "
            f"{model_type!r}; drop tensor_parallel or pipeline_parallel"
        )
    return True


def _llama_layer_plan(prefix: str, indices: list[int], sp: bool, qk_norm: bool) -> dict[str, Any]:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel

    stream = _stream(sp)
    plan: dict[str, Any] = {}
    for i in indices:
        at = f"{prefix}.layers.{i}"
        for name in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        ):
            plan[f"{at}.{name}"] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            # all-reduce (or under SP reduce-scatter) straight into the residual stream
            plan[f"{at}.{name}"] = RowwiseParallel(output_layouts=stream, use_local_output=False)
        for name in ("input_layernorm", "post_attention_layernorm"):
            plan[f"{at}.{name}"] = local_replicated(stream)
        # attention and MLP get the whole sequence as a plain tensor (one all-gather per block under SP)
        plan[f"{at}.self_attn"] = PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": stream},
            desired_input_kwarg_layouts={"hidden_states": Replicate()},
            use_local_output=True,
        )
        plan[f"{at}.mlp"] = PrepareModuleInput(
            input_layouts=(stream,), desired_input_layouts=(Replicate(),), use_local_output=True
        )
        if qk_norm:
            plan[f"{at}.self_attn.q_norm"] = local_replicated()
            plan[f"{at}.self_attn.k_norm"] = local_replicated()
    plan[f"{prefix}.norm"] = local_replicated(stream)
    return plan


def _vocab_plan(embed_name: str, stream: Any, dtensor_stream: bool) -> dict[str, Any]:
    """Vocab-parallel embedding and lm_head: both weights `Shard(0)` on the vocabulary (so a tie survives).

    The embedding's partial lookups are summed into the residual stream; the lm_head keeps its output a
    vocab-sharded DTensor (`Shard(-1)`) for `loss_parallel`.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {
        embed_name: RowwiseParallel(
            input_layouts=Replicate(), output_layouts=stream, use_local_output=not dtensor_stream
        ),
        "lm_head": ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1), use_local_output=False),
    }


def _generic_plan(model: nn.Module, prefix: str, base: nn.Module, tp_plan: dict[str, str]) -> dict[str, Any]:
    """Translate a config's `base_model_tp_plan` (wildcard module paths -> style names) to torch styles."""
    import re

    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    _check_generic_plan(tp_plan, getattr(model.config, "model_type", None))
    make = {
        "colwise": ColwiseParallel,
        "rowwise": RowwiseParallel,
        "replicated_with_grad_allreduce": local_replicated,
    }
    modules = dict(base.named_modules())
    plan: dict[str, Any] = {}
    for pattern, style in tp_plan.items():
        regex = re.compile(re.escape(pattern).replace(r"\*", r"[^.]+") + "$")
        matched = [name for name in modules if regex.match(name)]
        # Strict: a colwise layer whose rowwise partner was skipped would feed it the wrong width.
        if not matched or (
            style != "replicated_with_grad_allreduce"
            and not all(isinstance(modules[name], nn.Linear) for name in matched)
        ):
            raise UsageError(
                f"{type(model).__name__}: base_model_tp_plan entry {pattern!r} ({style}) matches no nn.Linear "
                f"module of this model; set tensor_parallel: 1"
            )
        for name in matched:
            plan[f"{prefix}.{name}"] = make[style]()
    return plan


# ---------------------------------------------------------------------------------------------- apply
def apply_tensor_parallel(model: nn.Module, tp_mesh: Any, *, sequence_parallel: bool = True) -> list[str]:
    """Shard `model` (a HF causal LM, full or on `meta`) over the 1-D `tp_mesh` in place; returns notes.

    Every rank must hold the same full weights (they are taken from rank 0) or be on `meta` (each rank then
    keeps the meta shard of its slice, to be materialised later). Apply before FSDP2, which then shards the
    TP-sharded parameters over the data-parallel mesh dimension. The training loss must run under
    `tp_loss_context(model)`.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    tp = tp_mesh.size()
    notes: list[str] = []
    if tp == 1:
        return notes
    check_tensor_parallel(model.config, tp)
    if is_vocab_parallel(model):
        raise RuntimeError(f"{type(model).__name__} is already tensor-parallel")
    prefix, base = _base_model(model)
    cfg = _text_config(model.config)
    model_type = getattr(cfg, "model_type", None)
    embed, head = model.get_input_embeddings(), getattr(model, "lm_head", None)
    stage = _pipeline_stage(model, model_type)  # a pipeline stage holds the embedding or lm_head or neither
    if not stage and (not isinstance(embed, nn.Embedding) or not isinstance(head, nn.Linear)):
        raise UsageError(
            f"{type(model).__name__}: tensor parallelism needs an nn.Embedding input embedding and an "
            f"nn.Linear lm_head; set tensor_parallel: 1"
        )
    tied = head is not None and embed is not None and head.weight is embed.weight
    if model_type in LLAMA_FAMILY:
        layers = getattr(base, "layers", None)
        indices = [int(name) for name, _ in layers.named_children()] if isinstance(layers, nn.ModuleList) else []
        plan = _llama_layer_plan(prefix, indices, sequence_parallel, LLAMA_FAMILY[model_type])
        if isinstance(base.norm, nn.Identity):  # a pipeline stage before the last
            del plan[f"{prefix}.norm"]
        _require(model, plan)
    else:
        plan = _generic_plan(model, prefix, base, cfg.base_model_tp_plan)
        if sequence_parallel:
            notes.append(
                f"sequence parallelism: not available for model_type {model_type!r}, TP runs without it"
            )
        sequence_parallel = False
    family = model_type in LLAMA_FAMILY  # generic plans hand plain tensors between modules
    embed_name = next((name for name, m in model.named_modules() if m is embed), None) if embed else None
    vocab = _vocab_plan(embed_name, _stream(sequence_parallel), dtensor_stream=family)
    plan.update({k: v for k, v in vocab.items() if k is not None and (k != "lm_head" or head is not None)})
    src_data_rank = None if any(p.is_meta for p in model.parameters()) else 0
    parallelize_module(model, tp_mesh, plan, src_data_rank=src_data_rank)
    if tied:  # each style replaced the shared Parameter with its own shard: share one again
        head.weight = embed.weight
    if stage:  # the residual stream crosses stages as a local tensor; the next stage rebuilds the DTensor
        from overdrive.parallel.pipeline import TP_STREAM_ATTR

        model.__dict__[TP_STREAM_ATTR] = (tp_mesh, _stream(sequence_parallel))
    if head is not None:
        head.__dict__[VOCAB_PARALLEL_ATTR] = True
        head.register_forward_hook(_gather_logits_without_grad)
    model.register_forward_pre_hook(_hook_partial_grads)
    model.loss_function = vocab_parallel_causal_lm_loss
    notes.append(
        f"tensor parallel {tp}: {len(plan)} modules sharded"
        + (", sequence parallel" if sequence_parallel else "")
        + (", tied embeddings kept tied" if tied else "")
    )
    return notes


# ---------------------------------------------------------------------------------------------- loss
def _gather_logits_without_grad(module: nn.Module, args: tuple, output: Any) -> Any:
    """Outside autograd (evaluation, `generate`) hand callers plain full logits, as the plain model does.

    Sampling code indexes and arg-maxes logits, which DTensor does not support on the vocab-sharded dim.
    """
    from torch.distributed.tensor import DTensor

    if isinstance(output, DTensor) and not torch.is_grad_enabled():
        return output.full_tensor()
    return output


def vocab_parallel_causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    vocab_size: int | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """HF's causal-LM loss (sum CE / `num_items_in_batch`, else mean) for vocab-sharded DTensor logits.

    Returns a plain scalar tensor. Under `tp_loss_context` the cross-entropy runs on the local vocabulary
    shards (`loss_parallel`); outside it DTensor gathers the logits first: the same value, more memory.
    """
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(logits, DTensor):
        from transformers.loss.loss_utils import ForCausalLMLoss

        return ForCausalLMLoss(
            logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels, **kwargs
        )
    logits = logits.float()
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    flat = logits.reshape(-1, logits.shape[-1])
    # A replicated DTensor target serves both paths: loss_parallel, and DTensor's gather-then-CE outside it.
    targets = DTensor.from_local(shift_labels.reshape(-1).to(flat.device), flat.device_mesh, [Replicate()])
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = nn.functional.cross_entropy(flat, targets, ignore_index=ignore_index, reduction=reduction)
    loss = loss.full_tensor()
    if num_items_in_batch is not None:
        loss = loss / (torch.as_tensor(num_items_in_batch).to(loss.device))
    return loss


def is_vocab_parallel(model: nn.Module) -> bool:
    """True once `apply_tensor_parallel` has sharded the model (its lm_head is vocab-parallel)."""
    return any(is_vocab_parallel_head(m) for m in model.modules())


@contextlib.contextmanager
def tp_loss_context(model: nn.Module) -> Iterator[None]:
    """Wrap forward *and* backward of a training step: `loss_parallel` when the lm_head is vocab-parallel."""
    if not is_vocab_parallel(model):
        yield
        return
    from torch.distributed.tensor.parallel import loss_parallel

    with loss_parallel():
        yield


# ---------------------------------------------------------------------------------------------- kernels
def kernels_compatible_with_tp(sequence_parallel: bool = True) -> dict[str, str | None]:
    """For each overdrive kernel (`overdrive.patches` feature): None if it runs correctly under TP, else why
    it must be switched off (the caller logs the reason once and patches without it).

    All run: the norms, RoPE and SwiGLU see plain local tensors (`LocalReplicated`, local heads, local MLP
    columns), and the fused linear-CE switches to its vocab-parallel form on a vocab-parallel lm_head
    (`overdrive.kernels.vocab_parallel_cross_entropy`). Patch before `apply_tensor_parallel`.
    """
    del sequence_parallel  # same verdicts with or without it
    return {"rms_norm": None, "rope": None, "swiglu": None, "fused_cross_entropy": None}


def compile_compatible_with_tp(activation_checkpointing: bool) -> str | None:
    """None if `torch.compile` of the decoder blocks pays off under TP, else why the caller should skip it.

    Measured with torch 2.13 (CPU, gloo): compiled TP blocks (with and without sequence parallelism) have no
    graph break and match eager. A block that is also recomputed (checkpoint inside the compiled region)
    graph-breaks on the norms' weight swap and dynamo runs it eagerly (still correct, nothing gained); with
    torch's own SequenceParallel norms that combination even fails in AOTAutograd (a DeviceMesh saved for
    backward).
    """
    if activation_checkpointing:
        return (
            "torch.compile does not compile tensor-parallel blocks that are also activation-checkpointed "
            "(dynamo falls back to eager inside the checkpoint); blocks run eagerly"
        )
    return None
