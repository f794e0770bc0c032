"""What every decode loop shares: the prompts in (left padding, RoPE positions, the prefill through the
model's own forward), the completions out, and how often the host looks at which rows finished."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

SYNC_EVERY = 8  # CUDA: decode steps between looks at which rows finished (on the CPU: every step)


@dataclass
class Completions:
    """Row i is a completion of prompt `prompt_index[i]`; a prompt's samples are contiguous."""

    prompt_index: list[int]
    token_ids: list[list[int]]  # up to and including the first eos (none when truncated)
    truncated: list[bool]  # True when max_new_tokens was reached before eos
    logprobs: list[list[float]] | None = None  # per sampled token, at the sampling temperature

    def __len__(self) -> int:
        return len(self.token_ids)


def left_pad(rows: list[list[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) [len(rows), longest]: each row's tokens at the right end."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions of left-padded rows: counted from each row's first real token."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def prefill(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor],
                                                                         list[torch.Tensor]]:
    """(last-position logits, per-layer keys, per-layer values) of left-padded prompts, through the
    model's own forward (under the caller's autocast, without its weight cache)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with prefill_autocast(ids.device):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_of(mask), cache=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
    return logits, [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


def prefill_autocast(device: torch.device) -> Any:
    """The caller's autocast for the prefill, without its weight cache. A cached bf16 cast of every
    fp32 weight would otherwise stay held until the caller's autocast ends, i.e. for the whole rollout,
    while the decode step runs on its own copies."""
    if not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type), cache_enabled=False)


def decode_dtype(model: Any, device: torch.device) -> torch.dtype:
    """The lean decode step's dtype: bf16 on CUDA, where decoding is bound by reading the weights (a
    full fine-tune's fp32 master weights stay fp32 in the model), else the model's own dtype."""
    return torch.bfloat16 if device.type == "cuda" else next(model.parameters()).dtype
