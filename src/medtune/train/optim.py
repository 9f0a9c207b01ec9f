"""The optimizer over the trainable (LoRA) parameters and its learning-rate schedule, from the recipe's train
section."""

from __future__ import annotations

import torch


def make_optimizer(cfg, params) -> torch.optim.Optimizer:
    """train.optimizer: sgd (momentum 0.9), adamw, or adamw_fused."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cfg.optimizer == "adamw_fused")


def warmup_steps(cfg, total_steps: int) -> int:
    """train.warmup_steps, or train.warmup_ratio of the run's steps."""
    return cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)


def make_scheduler(cfg, optimizer: torch.optim.Optimizer, total_steps: int):
    """train.lr_scheduler (transformers' schedules) with its warm-up, over `total_steps` optimizer steps."""
    from transformers import get_scheduler  # heavy: only when a training starts

    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup_steps(cfg, total_steps),
                         num_training_steps=total_steps)
