"""The optimizer (AdamW, fused on CUDA) and its learning-rate schedule: linear warmup, then cosine or
linear decay to zero."""

from __future__ import annotations

import math

LR_DECAYS = ("constant", "cosine", "linear")


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay: str = "cosine") -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if decay == "linear":
        return 1.0 - progress
    if decay == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown decay {decay!r}")


def make_scheduler(optimizer, total_steps: int, warmup_steps: int, decay: str = "cosine"):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, decay))


def adamw(params, device: str, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)):
    """AdamW over `params`; on CUDA its fused kernel (one launch for all parameters instead of several per
    tensor), elsewhere torch's default (the CPU's results stay as they were)."""
    import torch

    fused = True if str(device).startswith("cuda") else None
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=fused)
