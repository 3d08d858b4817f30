"""The optimizer and the learning-rate schedule, from the train section alone. Pure torch.

The schedule is a function of the step only, so a resumed run continues it exactly.
"""
from __future__ import annotations

import math

import torch

from .config import TrainConfig


def lr_at(step: int, train: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters (nanoGPT's schedule)."""
    t = train
    decay_iters = t.lr_decay_iters if t.lr_decay_iters is not None else t.max_iters
    if step < t.warmup_iters:
        return t.learning_rate * (step + 1) / (t.warmup_iters + 1)
    if step >= decay_iters:
        return t.min_lr
    ratio = (step - t.warmup_iters) / max(1, decay_iters - t.warmup_iters)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (t.learning_rate - t.min_lr)


def make_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW, weight decay on matrices only, fused where this torch supports it (CPU included)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # fused (CUDA and, since torch 2.4, CPU): one kernel for all parameters, and it skips a step on the device when
    # told found_inf, so a non-finite step costs no host sync
    return torch.optim.AdamW(groups, lr=train.learning_rate, betas=(train.beta1, train.beta2), fused=True)
