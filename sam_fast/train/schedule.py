"""The recipe's optimiser and learning-rate schedule (the paper's recipe: AdamW 0.9/0.999, lr 2e-5, weight decay 0.05 on >= 2-D weights, 240 warm-up steps then cosine).

AdamW (betas 0.9/0.999), weight decay 0.05 on >= 2-D weights only (biases and other 1-D tensors
get 0), a linear warm-up then a cosine decay:

    lr(s) = peak * (s + 1) / W                                   for s < W   (no step at lr 0)
    lr(s) = min + (peak - min) * (1 + cos(pi * (s - W) / (S - W))) / 2   for W <= s <= S

with s the 0-based optimiser step, W = warmup_steps (240 in the paper), S = max_steps.
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float = 0.0) -> float:
    """lr(step) / peak of the warm-up + cosine schedule above."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (>= 2-D) and not decayed (< 2-D) groups."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append((name, p))
    return [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]


def build_optimizer(model, lr: float, weight_decay: float = 0.05, betas=(0.9, 0.999), eps: float = 1e-8):
    """AdamW over the trainable parameters with the recipe's weight-decay split."""
    groups = [g for g in param_groups(model, weight_decay) if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def build_scheduler(optimizer, warmup_steps: int, max_steps: int, min_ratio: float = 0.0):
    """LambdaLR with `lr_factor`; call `.step()` after every optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, max_steps, min_ratio)
    )
