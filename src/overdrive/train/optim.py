"""AdamW and the learning-rate schedule."""

from __future__ import annotations

import torch
from torch import nn
from transformers import get_scheduler

from overdrive.config import TrainConfig


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on 1-D parameters (norms, biases). Fused kernel where the params allow it."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    plain = all(type(p) in (torch.Tensor, nn.Parameter) for p in decay + no_decay)
    if plain:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):
            pass  # device or dtype without a fused kernel
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    return cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    warm = warmup_steps(cfg, total_steps)
    if cfg.lr_scheduler == "cosine":
        return get_scheduler(
            "cosine_with_min_lr",
            optimizer,
            num_warmup_steps=warm,
            num_training_steps=total_steps,
            scheduler_specific_kwargs={"min_lr_rate": cfg.min_lr_ratio},
        )
    if cfg.lr_scheduler == "linear":
        return get_scheduler("linear", optimizer, num_warmup_steps=warm, num_training_steps=total_steps)
    return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warm)
