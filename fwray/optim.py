"""The optimizer and the learning-rate schedule, from the train section alone. Pure torch.

The schedule is a multiplier of the base rate and a function of the step only, so a resumed run continues it exactly.
"""
from __future__ import annotations

import math

import torch

from .config import TrainConfig


def make_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW, weight decay on matrices only, fused where this torch supports it (CPU included)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # fused (CUDA and, since torch 2.4, CPU): one kernel for all parameters, and it skips a step on the device when
    # told found_inf, so a non-finite step costs no host sync
    return torch.optim.AdamW(groups, lr=train.learning_rate, betas=(train.beta1, train.beta2), fused=True)


def lr_multiplier(step: int, train: TrainConfig) -> float:
    """The schedule at `step`, as a share of every group's base rate: linear warmup to 1, then decay to
    min_lr / learning_rate at lr_decay_iters (the floor after it) by a cosine (nanoGPT's) or, under wsd, a constant
    1 and a linear decay over the last decay_fraction of lr_decay_iters."""
    t = train
    end = t.lr_decay_iters if t.lr_decay_iters is not None else t.max_iters
    floor = t.min_lr / t.learning_rate
    if step < t.warmup_iters:
        return (step + 1) / (t.warmup_iters + 1)
    if step >= end:
        return floor
    if t.schedule == "wsd":
        start = (1 - t.decay_fraction) * end
        decayed = max(0.0, (step - start) / (end - start))
    else:
        decayed = 0.5 * (1.0 - math.cos(math.pi * (step - t.warmup_iters) / max(1, end - t.warmup_iters)))
    return 1.0 - decayed * (1.0 - floor)
