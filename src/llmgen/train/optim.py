"""AdamW parameter groups and learning-rate schedules (pure functions of the step)."""

from __future__ import annotations

import inspect
import math

import torch

from llmgen.config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; never decay norms, biases or embeddings' positions (1-D params)."""
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and "pos_emb" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, t: TrainConfig, device_type: str) -> torch.optim.AdamW:
    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                             eps=1e-8, **({"fused": True} if fused else {}))


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): warmup, then the schedule down to min_lr."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    span = max(1, t.max_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    if t.schedule == "cosine":
        return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))
    if t.schedule == "linear":
        return t.lr - (t.lr - t.min_lr) * progress
    # wsd: warmup, stable at lr, then linear decay over the last 20% of steps
    decay_start = t.max_steps - max(1, int(0.2 * t.max_steps))
    if step < decay_start:
        return t.lr
    return t.lr - (t.lr - t.min_lr) * min(1.0, (step - decay_start) / max(1, t.max_steps - decay_start))
