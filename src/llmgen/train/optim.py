"""AdamW parameter groups and learning-rate schedules (pure functions of the step)."""

from __future__ import annotations

import inspect
import math
import re

import torch

from llmgen.config import TrainConfig
from llmgen.errors import LlmgenError
from llmgen.kernels import training


def lr_scale(name: str, n_layer: int, decay: float) -> float:
    """Layer-wise LR decay: the top block trains at the full LR, each block below at `decay` times the
    one above, the embeddings below block 0; the final norm and an untied head at the full LR."""
    if decay == 1.0:
        return 1.0
    m = re.search(r"(?:^|\.)blocks\.(\d+)\.", name)
    if m:
        return decay ** (n_layer - 1 - int(m.group(1)))
    if re.search(r"(?:^|\.)(tok_emb|pos_emb)\.", name):
        return decay ** n_layer
    return 1.0


def param_groups(model: torch.nn.Module, weight_decay: float, layer_lr_decay: float = 1.0) -> list[dict]:
    """Decay matrices; never decay norms, biases or embeddings' positions (1-D params). With layer-wise
    LR decay, one group per (decay, lr_scale); the trainer multiplies the scheduled LR by lr_scale."""
    groups: dict[tuple[bool, float], list] = {}
    seen = set()
    n_layer = getattr(getattr(model, "cfg", None), "n_layer", 0)
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        decays = p.dim() >= 2 and "pos_emb" not in name
        groups.setdefault((decays, lr_scale(name, n_layer, layer_lr_decay)), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if d else 0.0, "lr_scale": s}
            for (d, s), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], -kv[0][1]))]


def make_optimizer(model: torch.nn.Module, t: TrainConfig, device_type: str,
                   layer_lr_decay: float = 1.0) -> torch.optim.AdamW:
    """AdamW over `param_groups`, fused on CUDA and on the CPU (where torch would otherwise loop over
    the tensors one by one: the fused kernel made whole steps 4-5 % faster from the shakespeare-char
    shape to `small`, measured alternating in one process); not under FSDP's sharded parameters."""
    fused = device_type in ("cuda", "cpu") and t.distributed != "fsdp" \
        and "fused" in inspect.signature(torch.optim.AdamW).parameters
    groups = param_groups(model, t.weight_decay, layer_lr_decay)
    if not groups:
        raise LlmgenError("no parameter is trainable; check finetune.method / trainable_layers / trainable_parts")
    cls = AdamW if fused and device_type == "cpu" else torch.optim.AdamW
    return cls(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, **({"fused": True} if fused else {}))


class AdamW(torch.optim.AdamW):
    """torch's fused AdamW whose CPU step goes through the training kernels once `kernels.training.enable` has
    set `cpu_kernels` (adamw_step: one parallel loop over every tensor, ~20 % faster; fold_clip's norm on every
    thread too), torch's own step otherwise; the same state either way, so checkpoints move between the two."""

    cpu_kernels = False

    def step(self, closure=None):
        if closure is None and self.cpu_kernels and training.adamw_step(self):
            return None
        return super().step(closure)


def fold_clip(optimizer: torch.optim.Optimizer, max_norm: float) -> bool:
    """Clip the gradients' global norm to `max_norm` inside a fused AdamW's next step: the factor goes in as its
    `grad_scale` input (it divides each gradient by it as it reads it, as under a GradScaler), which saves a
    pass over every gradient (~0.5 ms of a 37 ms shakespeare-char step on 2 cores). False (nothing done)
    for an optimizer that is not fused. The caller sets `grad_scale` back to None after the step."""
    if not optimizer.defaults.get("fused"):
        return False
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if grads:
        norm = training.grad_norm(grads) if getattr(optimizer, "cpu_kernels", False) else None  # on every thread
        if norm is None:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        optimizer.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0)  # torch's clip factor, inverted
    return True


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
