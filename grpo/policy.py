"""What a GRPO step reads and trains (`Policy`): the model and its wrappers, the reference, the
optimizer, the rewards and the prompt format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from data.prompt import DEFAULT_FORMAT, PromptFormat
from sampling import Sampler


@dataclass
class Policy:
    """What a step reads and trains: the model (sampling, saving), the module backward passes go
    through (DDP's wrapper, or the model), the frozen reference (None: LoRA's disabled adapter, or
    beta 0), the optimizer and schedule, and the rollouts' `Sampler` (its engine settings and the CUDA-graph
    decode state it keeps across rollouts)."""

    model: Any
    train_model: Any
    ref_model: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    device: str
    rewards: list[tuple[str, Any, float]]  # (name, function, weight): the advantage uses the weighted sum
    sampler: Sampler
    prompt: PromptFormat = DEFAULT_FORMAT  # how questions become prompts (data/prompt.py)

    def autocast(self) -> Any:
        from models import autocast

        return autocast(self.device)

    def reward_sum(self, scores: torch.Tensor) -> torch.Tensor:
        """The advantage's reward: [rows, reward functions] scores summed with their weights, a reward's
        None (NaN) skipped."""
        return scores.nan_to_num(0.0) @ torch.tensor([w for _, _, w in self.rewards])
