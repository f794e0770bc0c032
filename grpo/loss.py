"""GRPO loss math: pure tensor functions, no model, no I/O.

Shapes: B completions (G per prompt, groups contiguous), T completion positions, V vocabulary.
`mask` [B, T] is 1 on real completion tokens (eos included) and 0 on padding.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")
IS_LEVELS = ("token", "sequence")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """Reward minus its group's mean, divided by (std + eps): the group's std (`group`), the batch's
    (`batch`) or not at all (`none`). std is unbiased (torch's default); a group of equal rewards
    gets advantage 0."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, not {scale!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    centered = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1)
        return centered / (std + eps)
    if scale == "batch":
        return centered / (rewards.float().std() + eps)
    return centered


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str,
              max_completion_length: int | None = None, num_items_in_batch: float | None = None) -> torch.Tensor:
    """Reduce a [B, T] per-token quantity to a scalar the way `loss_type` says (TRL's formulas). A row whose
    mask is all 0 (a completion taken out of the loss by --mask_truncated_completions) counts in no
    normalizer: not in grpo's mean over rows, not in dr_grpo's rows x length."""
    rows = mask.any(-1).sum().clamp(min=1)  # rows with no token (masked out of the loss) do not count
    if loss_type == "grpo":  # mean over sequences of each sequence's token mean
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / rows
    if loss_type == "bnpo":  # token mean over the batch
        return masked_mean(per_token, mask)
    if loss_type == "dr_grpo":  # constant normalizer: no length bias
        length = max_completion_length if max_completion_length is not None else per_token.shape[1]
        return (per_token * mask).sum() / (rows * length)
    if loss_type == "dapo":  # token sum over the completion tokens of the whole optimizer step
        denominator = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
        return (per_token * mask).sum() / denominator
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    num_items_in_batch: float | None = None,
    importance_sampling_level: str = "token",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate plus beta * k3 KL to the reference, aggregated by `loss_type`.

    Per token: r = exp(logp - old); surrogate = -min(r*A, clamp(r, 1-eps_low, 1+eps_high)*A);
    `importance_sampling_level="sequence"` (GSPO, Zheng et al. 2025) uses one ratio per completion,
    r = exp(mean over its tokens of (logp - old)), for every token of it (the gradient still flows
    through each token's logp);
    KL = exp(ref - logp) - (ref - logp) - 1; loss = surrogate + beta*KL.
    `old_logprobs=None` is on-policy (logp.detach(), so r == 1 with the policy gradient's value).
    Returns (loss, metrics): policy_loss + kl_loss == grpo_loss; kl is the masked token mean of KL.
    """
    mask = mask.to(logprobs.dtype)
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    adv = advantages.to(logprobs.dtype).unsqueeze(1)
    if importance_sampling_level not in IS_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}, not {importance_sampling_level!r}")
    log_ratio = logprobs - old
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)
    ratio = torch.exp(log_ratio).expand_as(logprobs)
    surrogate = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon_low, 1 + eps_high) * adv)
    agg = dict(mask=mask, loss_type=loss_type, max_completion_length=max_completion_length,
               num_items_in_batch=num_items_in_batch)
    policy_loss = aggregate(surrogate, **agg)
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("ref_logprobs is required when beta != 0")
        delta = ref_logprobs - logprobs
        kl = torch.exp(delta) - delta - 1
        kl_loss = beta * aggregate(kl, **agg)
        mean_kl = masked_mean(kl.detach(), mask).item()
    else:
        kl_loss = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
        mean_kl = 0.0
    loss = policy_loss + kl_loss
    with torch.no_grad():
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(mask.dtype)
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(mask.dtype)
        metrics = {
            "grpo_loss": loss.item(),
            "policy_loss": policy_loss.item(),
            "kl_loss": kl_loss.item(),
            "kl": mean_kl,
            "clip_ratio_low": masked_mean(low, mask).item(),
            "clip_ratio_high": masked_mean(high, mask).item(),
            "clip_ratio_region": masked_mean(torch.maximum(low, high), mask).item(),
        }
    return loss, metrics
