"""The optimizer (--optimizer: torch AdamW/SGD, bitsandbytes 8-bit AdamW, GaLore AdamW, HF Adafactor) and the
learning-rate schedule.

Every choice keeps the same parameter groups: weight decay on matrices, none on 1-D parameters (norms, biases).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from overdrive.config import TrainConfig
from overdrive.errors import UsageError

if TYPE_CHECKING:
    from overdrive.parallel.strategy import Strategy

# optimizers whose state or update needs plain (not DTensor, not flattened-by-DeepSpeed) 2-D parameters
NEEDS_PLAIN_PARAMS = ("adamw-8bit", "paged-adamw-8bit", "galore-adamw")


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The --optimizer over the model's trainable parameters; no weight decay on 1-D parameters."""
    # empty groups dropped: LoRA often trains no 1-D parameter, and DeepSpeed ZeRO-3 drops empty groups
    # from the optimizer it wraps, which the LR scheduler (built on all groups) then fails on
    groups = [g for g in decay_groups(model, cfg.weight_decay) if g["params"]]
    name = cfg.optimizer
    if name == "adamw":
        return make_adamw(groups, cfg)
    if name in ("adamw-8bit", "paged-adamw-8bit"):
        return make_adamw_8bit(groups, cfg, paged=name == "paged-adamw-8bit")
    if name == "galore-adamw":
        return make_galore(model, cfg)
    if name == "adafactor":
        return make_adafactor(groups, cfg)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=cfg.sgd_momentum, foreach=True)
    raise UsageError(
        f"--optimizer {name!r} is unknown; use adamw, adamw-8bit, paged-adamw-8bit, galore-adamw, adafactor or sgd"
    )


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: matrices (decayed) and 1-D parameters (not decayed), trainable parameters only."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adam_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    return dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)


def make_adamw(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """torch AdamW; the fused kernel where the params allow it (plain tensors on a device that has one)."""
    params = [p for g in groups for p in g["params"]]
    if all(type(p) in (torch.Tensor, nn.Parameter) for p in params):
        try:
            return torch.optim.AdamW(groups, fused=True, **adam_kwargs(cfg))
        except (RuntimeError, ValueError):
            pass  # device or dtype without a fused kernel
    return torch.optim.AdamW(groups, foreach=True, **adam_kwargs(cfg))


def make_adamw_8bit(groups: list[dict[str, Any]], cfg: TrainConfig, paged: bool) -> torch.optim.Optimizer:
    """bitsandbytes' block-wise 8-bit AdamW (paged: state in CUDA unified memory; on CPU it is not paged)."""
    bnb_optim = _import_bitsandbytes()
    cls = bnb_optim.PagedAdamW8bit if paged else bnb_optim.AdamW8bit
    optimizer = cls(groups, **adam_kwargs(cfg))
    params = [p for g in groups for p in g["params"]]
    if paged and params and params[0].device.type == "cpu":
        optimizer._cpu_paged_warned = True  # bitsandbytes' own warning, said once here instead
        print(
            "overdrive: note: paged-adamw-8bit on CPU keeps its state unpaged (paging needs CUDA)",
            file=sys.stderr,
        )
    return optimizer


def _import_bitsandbytes() -> Any:
    try:
        import bitsandbytes.optim as bnb_optim
    except ImportError:
        raise UsageError(
            "--optimizer adamw-8bit/paged-adamw-8bit needs bitsandbytes; pip install bitsandbytes"
        ) from None
    return bnb_optim


def galore_targets(model: nn.Module, target: str) -> list[nn.Parameter]:
    """Trainable 2-D weights of nn.Linear modules whose qualified name contains one of the comma-separated
    names (`attn,mlp` picks Llama's q/k/v/o and gate/up/down projections)."""
    names = [t.strip() for t in target.split(",") if t.strip()]
    found = []
    for fqn, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(n in fqn for n in names):
            w = module.weight
            if w.requires_grad and w.ndim == 2:
                found.append(w)
    return found


def make_galore(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """galore-torch's AdamW: the target weights' gradients projected to rank r (state r × n, not m × n); the
    other parameters train with full AdamW in the same optimizer, the usual two decay groups."""
    try:
        from galore_torch import GaLoreAdamW
    except ImportError:
        raise UsageError("--optimizer galore-adamw needs galore-torch; pip install galore-torch") from None
    projected = galore_targets(model, cfg.galore_target)
    if not projected:
        raise UsageError(
            f"--galore-target {cfg.galore_target!r} matches no linear layer of the model; "
            "name parts of module names, e.g. attn,mlp"
        )
    ids = {id(p) for p in projected}
    groups = decay_groups(model, cfg.weight_decay)
    groups[0]["params"] = [p for p in groups[0]["params"] if id(p) not in ids]
    galore = {
        "params": projected,
        "weight_decay": cfg.weight_decay,
        "rank": cfg.galore_rank,
        "update_proj_gap": cfg.galore_update_gap,
        "scale": cfg.galore_scale,
        "proj_type": cfg.galore_proj_type,
    }
    optimizer = GaLoreAdamW(
        [g for g in groups if g["params"]] + [galore], no_deprecation_warning=True, **adam_kwargs(cfg)
    )
    make_galore_checkpointable(optimizer)
    return optimizer


def make_galore_checkpointable(optimizer: torch.optim.Optimizer) -> None:
    """GaLore keeps its projector (a Python object) in the state; checkpoints store its matrix as a tensor
    instead (so `weights_only` loading and DCP accept them) and loading rebuilds the projector."""

    def to_tensors(_opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        for key, entry in list(state_dict["state"].items()):
            projector = entry.get("projector")
            if projector is not None:
                entry = {k: v for k, v in entry.items() if k != "projector"}
                ortho = projector.ortho_matrix
                matrices = ortho if isinstance(ortho, list) else [] if ortho is None else [ortho]
                for i, matrix in enumerate(matrices):  # proj_type full keeps two
                    entry[f"galore_ortho_{i}"] = matrix
                state_dict["state"][key] = entry
        return state_dict

    def to_projectors(opt: torch.optim.Optimizer) -> None:
        from galore_torch.galore_projector import GaLoreProjector

        for group in opt.param_groups:
            if "rank" not in group:
                continue
            for p in group["params"]:
                state = opt.state.get(p)
                if not state or "projector" in state:
                    continue
                matrices = [state.pop(k) for k in ("galore_ortho_0", "galore_ortho_1") if k in state]
                projector = GaLoreProjector(
                    group["rank"],
                    update_proj_gap=group["update_proj_gap"],
                    scale=group["scale"],
                    proj_type=group["proj_type"],
                )
                if matrices:
                    projector.ortho_matrix = matrices if group["proj_type"] == "full" else matrices[0]
                state["projector"] = projector

    optimizer.register_state_dict_post_hook(to_tensors)
    optimizer.register_load_state_dict_post_hook(to_projectors)


def make_adafactor(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """transformers' Adafactor driven by the run's learning rate and schedule (no relative step sizes)."""
    from transformers.optimization import Adafactor

    return Adafactor(
        groups, lr=cfg.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False
    )


def check_optimizer(cfg: TrainConfig, strategy: Strategy) -> None:
    """Combinations that cannot work fail before anything starts: 8-bit and GaLore update plain 2-D tensors,
    which FSDP2/HSDP and tensor parallelism (DTensor shards) and DeepSpeed ZeRO (flat partitions) do not give."""
    name = cfg.optimizer
    if name not in NEEDS_PLAIN_PARAMS:
        return
    layout = None
    if strategy.engine == "deepspeed":
        layout = "the deepspeed engine (ZeRO hands the optimizer flattened partitions)"
    elif strategy.data_parallel in ("fsdp", "hsdp"):
        layout = f"{strategy.data_parallel} (FSDP2 shards parameters as DTensors)"
    elif strategy.tensor_parallel != 1:
        layout = "tensor parallelism (parameters are DTensor shards)"
    if layout is not None:
        raise UsageError(
            f"--optimizer {name} cannot run under {layout}; use --optimizer adamw there, or a single/ddp strategy"
        )


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state on this rank (local shards of DTensors), including
    tensors held by state objects (GaLore's projection matrices)."""
    from torch.distributed.tensor import DTensor

    seen: set[int] = set()
    total = 0
    for value in _state_tensors(getattr(optimizer, "state", {})):
        local = value.to_local() if isinstance(value, DTensor) else value
        if id(local) not in seen:
            seen.add(id(local))
            total += local.numel() * local.element_size()
    return total


def _state_tensors(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors inside a state value: dicts, lists and tuples, and (one level) the attributes of objects."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _state_tensors(v, depth)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _state_tensors(v, depth)
    elif depth == 0 and hasattr(value, "__dict__"):
        for v in vars(value).values():
            yield from _state_tensors(v, depth + 1)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    return cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """HF Trainer's schedules (`get_scheduler`'s linear, constant_with_warmup, cosine_with_min_lr), step for step.

    Written here on torch's LambdaLR rather than imported: transformers.optimization imports
    transformers.trainer_utils, which imports peft and bitsandbytes — 1.8 s of a 11 s tiny run's start on 2
    cores, paid by every rank of every run. tests/train/test_optimizers.py pins every step's lr to
    transformers' own. The lambdas are partials, as HF's are, so scheduler state dicts keep their shape.
    """
    from functools import partial

    warm = warmup_steps(cfg, total_steps)
    if cfg.lr_scheduler == "cosine":
        factor = partial(
            cosine_factor, warmup=warm, total=total_steps, min_ratio=cfg.min_lr_ratio, cycles=0.5
        )
    elif cfg.lr_scheduler == "linear":
        factor = partial(linear_factor, warmup=warm, total=total_steps)
    else:
        factor = partial(constant_factor, warmup=warm)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_ramp(step: int, warmup: int) -> float:
    """The linear warm-up from 0 that all three schedules start with."""
    return float(step) / float(max(1, warmup))


def constant_factor(step: int, *, warmup: int) -> float:
    """Linear warm-up from 0, then 1."""
    return warmup_ramp(step, warmup) if step < warmup else 1.0


def linear_factor(step: int, *, warmup: int, total: int) -> float:
    """Linear warm-up from 0, then linear decay to 0 at `total`."""
    if step < warmup:
        return warmup_ramp(step, warmup)
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def cosine_factor(step: int, *, warmup: int, total: int, min_ratio: float, cycles: float) -> float:
    """Linear warm-up from 0, then half a cosine from 1 down to `min_ratio` at `total`."""
    if step < warmup:
        return warmup_ramp(step, warmup)
    progress = float(step - warmup) / float(max(1, total - warmup))
    factor = 0.5 * (1.0 + math.cos(math.pi * float(cycles) * 2.0 * progress))
    return max(0, factor * (1 - min_ratio) + min_ratio)
