"""Optimizers and the warm-up schedule, built from the `optim` config group for every trained model."""
from __future__ import annotations

import torch

from rlhf_lab.config import OptimConfig


def build_optimizer(params, cfg: OptimConfig, lr: float | None = None,
                    weight_decay: float | None = None) -> torch.optim.Optimizer:
    """optim.name with its betas; lr / weight decay from the group unless a trainer's own key overrides them
    (PPO's actor_lr and critic_lr, sft.lr, reward_model.lr)."""
    params = [p for p in params if p.requires_grad]
    lr = cfg.lr if lr is None else lr
    weight_decay = cfg.weight_decay if weight_decay is None else weight_decay
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), weight_decay=weight_decay)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optim.name: unknown optimizer {cfg.name!r}; valid: adamw, rmsprop, sgd")


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from ~0 to the base lr over `warmup_steps`, then constant (the DPO paper's schedule)."""
    warmup = max(1, warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
