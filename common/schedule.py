"""Learning-rate schedule: linear warmup, then cosine or linear decay to zero."""

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
