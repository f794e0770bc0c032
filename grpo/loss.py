"""GRPO loss math: pure tensor functions, no model, no I/O.

Shapes: B completions (G per prompt, groups contiguous), T completion positions, V vocabulary.
`mask` [B, T] is 1 on real completion tokens (eos included) and 0 on padding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

SCALES = ("group", "batch", "none")
IS_LEVELS = ("token", "sequence")
ROLLOUT_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
# what `sampler_drift` measures of one loss call: figures that add up over micro-batches and ranks, and
# extremes that combine by max (the smallest ratio as its negative, so one max reduction serves both)
DRIFT_SUMS = ("sampler_tokens", "sampler_logp_diff_sum", "sampler_kl_sum", "sampler_ratio_sum",
              "rollout_correction_truncated_tokens", "rollout_correction_masked_tokens",
              "rollout_correction_masked_rows")
DRIFT_MAXES = ("sampler_logp_diff_max", "sampler_ratio_max", "sampler_ratio_min_negated")


@dataclass(frozen=True)
class Counts:
    """What an aggregation divides by, when a loss call is one part of the step (None: the call's own)."""

    tokens: float | None = None  # bnpo: the completion tokens of the call's micro-batch, skipped rows too
    max_length: float | None = None  # dr_grpo: the completion-length limit
    step_tokens: float | None = None  # dapo: the completion tokens of the whole step, every rank's


def _row_mean_of_token_means(x: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, c: Counts) -> torch.Tensor:
    return ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / rows


def _token_mean(x: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, c: Counts) -> torch.Tensor:
    return (x * mask).sum() / (mask.sum().clamp(min=1) if c.tokens is None else c.tokens)


def _sum_over_rows_times_limit(x: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, c: Counts) -> torch.Tensor:
    return (x * mask).sum() / (rows * (x.shape[1] if c.max_length is None else c.max_length))


def _sum_over_step_tokens(x: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, c: Counts) -> torch.Tensor:
    return (x * mask).sum() / (mask.sum().clamp(min=1) if c.step_tokens is None else c.step_tokens)


@dataclass(frozen=True)
class LossType:
    """One `--loss_type`: how per-token terms become the step's loss, and how the step's micro-batches
    (and DDP ranks, which average) add up to it. `reduce(x, mask, rows, counts)` is the formula on one
    loss call (`rows`: its rows with a token); `weight(trained, rows, step_rows)` multiplies a
    micro-batch's loss, `trained` of its `rows` in the loss having gone through the forward (rows with
    advantage 0 may skip it), `step_rows` being the step's rows in the loss over every rank."""

    formula: str  # the step's loss, for the docs
    reduce: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Counts], torch.Tensor]
    weight: Callable[[int, int, int], float]
    split: str  # how the micro-batches add up, for the docs
    exact: bool  # the step's loss is the same whatever --micro_batch_size and the number of ranks
    source: str


# To add a loss type: one entry here (its formula, its micro-batch weight, whether that split is exact);
# the CLI's choices, the docs' table (docs/training.md, `python -m grpo.loss`) and the tests' list follow.
LOSS_TYPES_TABLE: dict[str, LossType] = {
    "grpo": LossType(
        "mean over completions of each completion's token mean", _row_mean_of_token_means,
        lambda trained, rows, step_rows: trained / max(step_rows, 1),
        "each micro-batch's mean weighted by its share of the step's completions", True,
        "GRPO paper (Shao et al., 2024)"),
    "bnpo": LossType(
        "token mean over each micro-batch", _token_mean,
        lambda trained, rows, step_rows: rows / max(step_rows, 1),
        "each micro-batch's token mean weighted by its share of the step's completions: the row-weighted "
        "mean of token means, so it depends on --micro_batch_size (dapo is its exact step-wide version)", False,
        "TRL's bnpo (per-device batch)"),
    "dr_grpo": LossType(
        "token sum / (completions x --max_completion_length)", _sum_over_rows_times_limit,
        lambda trained, rows, step_rows: trained / max(step_rows, 1),
        "each micro-batch's value weighted by its share of the step's completions", True,
        "Dr. GRPO (Liu et al., 2025)"),
    "dapo": LossType(
        "token sum / the step's completion tokens", _sum_over_step_tokens,
        lambda trained, rows, step_rows: 1.0,
        "summed: each micro-batch already divides by the whole step's tokens", True,
        "DAPO (Yu et al., 2025); the default"),
}
LOSS_TYPES = tuple(LOSS_TYPES_TABLE)


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
              max_completion_length: int | None = None, num_items_in_batch: float | None = None,
              counts: Counts | None = None) -> torch.Tensor:
    """Reduce a [B, T] per-token quantity to a scalar the way `loss_type` says (LOSS_TYPES_TABLE). A row
    whose mask is all 0 (a completion taken out of the loss by --mask_truncated_completions) counts in
    no normalizer: not in grpo's mean over rows, not in dr_grpo's rows x length. `counts` (default: from
    `max_completion_length` and `num_items_in_batch`) are the step's normalizers when this is one part."""
    if loss_type not in LOSS_TYPES_TABLE:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")
    counts = counts or Counts(max_length=max_completion_length, step_tokens=num_items_in_batch)
    rows = mask.any(-1).sum().clamp(min=1)  # rows with no token (masked out of the loss) do not count
    return LOSS_TYPES_TABLE[loss_type].reduce(per_token, mask, rows, counts)


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """1.0 at the tokens of `mask` whose entropy is among the highest `quantile` share of theirs (at or
    above their (1 - quantile) quantile), 0.0 elsewhere: [B, T]. The "80/20" high-entropy-token rule
    (Wang et al., 2025; TRL's top_entropy_quantile), over the tokens given (a micro-batch)."""
    keep = mask.bool()
    values = entropy.detach()[keep].float()
    if values.numel() == 0:
        return torch.zeros_like(mask, dtype=entropy.dtype)
    threshold = torch.quantile(values, 1.0 - quantile)
    return ((entropy.detach() >= threshold) & keep).to(entropy.dtype)


def loss_types_markdown() -> str:
    """The docs' table of loss types (docs/training.md holds it; a test keeps the two equal)."""
    lines = ["| `--loss_type` | the step's loss | micro-batches and ranks | exact split | from |",
             "| --- | --- | --- | --- | --- |"]
    for name, t in LOSS_TYPES_TABLE.items():
        lines.append(f"| `{name}` | {t.formula} | {t.split} | {'yes' if t.exact else 'no'} | {t.source} |")
    return "\n".join(lines)


@torch.no_grad()
def sampler_drift(trainer: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor, mode: str = "none",
                  cap: float = 2.0) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """How far the sampler's per-token log-probs are from the trainer's, and the rollout correction's
    weights (None for `mode` "none"). All [B, T]: `trainer` the log-probs the loss's ratio starts from
    (the old policy's; the current one, detached, on-policy), `sampler` the ones the tokens were drawn
    with, `mask` 1 on the tokens in the loss.

    Per token log r = trainer - sampler, r the importance ratio trainer / sampler. The figures (0-dim
    tensors, DRIFT_SUMS and DRIFT_MAXES): |log r| and k3 = r - log r - 1 (an estimate of
    KL(sampler || trainer) from the sampler's own draws) summed, r's sum, max and min, the raw ratio
    before any cap. The weights multiply each token's policy term: `token_*` one r per token,
    `sequence_*` one per completion, exp(sum of its tokens' log r) (the completion's probability ratio,
    as TRL's sequence modes); `*_truncate` min(r, cap); `*_mask` r, or 0 where r > cap (above the cap
    only, as TRL). Weights are [B, T] (token) or [B, 1] (sequence)."""
    if mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"rollout correction must be one of {ROLLOUT_CORRECTIONS}, not {mode!r}")
    live = mask > 0
    m = live.to(torch.float32)
    # padding's log-probs are whatever pack() left there: zeroed so no inf or NaN leaks into a sum
    log_r = torch.where(live, trainer.float() - sampler.float(), 0.0)
    r = log_r.exp()
    inf = torch.tensor(float("inf"), device=r.device)
    stats = {"sampler_tokens": m.sum(), "sampler_logp_diff_sum": log_r.abs().sum(),
             # k3 as expm1(log r) - log r: exact to float32 where r - log r - 1 would round to 0 or below
             "sampler_kl_sum": ((torch.expm1(log_r) - log_r) * m).sum(), "sampler_ratio_sum": (r * m).sum(),
             "sampler_logp_diff_max": log_r.abs().max(),  # padding's 0 never exceeds a token's |log r|
             "sampler_ratio_max": torch.where(live, r, -inf).max(),
             "sampler_ratio_min_negated": -torch.where(live, r, inf).min()}
    zero = m.sum() * 0
    stats.update(rollout_correction_truncated_tokens=zero, rollout_correction_masked_tokens=zero,
                 rollout_correction_masked_rows=zero)
    if mode == "none":
        return None, stats
    w = log_r.sum(-1, keepdim=True).exp() if mode.startswith("sequence") else r
    over = (w > cap).expand_as(m) & live  # the tokens the cap acts on
    if mode.endswith("truncate"):
        stats["rollout_correction_truncated_tokens"] = over.sum().float()
        return w.clamp(max=cap), stats
    stats["rollout_correction_masked_tokens"] = over.sum().float()
    stats["rollout_correction_masked_rows"] = (live.any(-1) & (over | ~live).all(-1)).sum().float()
    return w.masked_fill(w > cap, 0.0), stats


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
    counts: Counts | None = None,
    as_tensors: bool = False,
    sampler_logprobs: torch.Tensor | None = None,
    rollout_correction: str = "none",
    rollout_correction_cap: float = 2.0,
    policy_mask: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate plus beta * k3 KL to the reference, aggregated by `loss_type`.

    Per token: r = exp(logp - old); surrogate = -min(r*A, clamp(r, 1-eps_low, 1+eps_high)*A);
    `importance_sampling_level="sequence"` (GSPO, Zheng et al. 2025) uses one ratio per completion,
    r = exp(mean over its tokens of (logp - old)), for every token of it (the gradient still flows
    through each token's logp);
    KL = exp(ref - logp) - (ref - logp) - 1; loss = surrogate + beta*KL.
    `old_logprobs=None` is on-policy (logp.detach(), so r == 1 with the policy gradient's value).
    Returns (loss, metrics): policy_loss + kl_loss == grpo_loss; kl is the masked token mean of KL.
    `as_tensors`: the metrics as 0-dim tensors, so the caller reads them all at once (each `.item()` is a
    device sync).
    `sampler_logprobs` [B, T]: the log-probs the rollout engine drew the tokens with; the metrics then
    hold `sampler_drift`'s figures against `old` (DRIFT_SUMS, DRIFT_MAXES), and `rollout_correction`
    (not "none") multiplies each token's surrogate (the policy term, not the KL) by its detached weight
    before the aggregation, so every loss type and importance-sampling level takes it and the
    micro-batches still add up as the table says. Capped ratios use `rollout_correction_cap`.
    `policy_mask` [B, T] (--top_entropy_quantile, `high_entropy_mask`): only its tokens keep their
    surrogate; the KL term and every normalizer still count all of `mask`'s tokens (as TRL does).
    `entropy` [B, T], differentiable, with `entropy_coef` != 0 (--entropy_coef): the loss subtracts
    entropy_coef times the entropy, aggregated like the surrogate (an exploration bonus); the metrics then
    add `entropy_loss` (that term, already negative for a bonus) to what `grpo_loss` sums.
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
    drift: dict[str, torch.Tensor] = {}
    if sampler_logprobs is not None:
        weights, drift = sampler_drift(old.detach(), sampler_logprobs, mask, rollout_correction,
                                       rollout_correction_cap)
        if weights is not None:
            surrogate = surrogate * weights.to(surrogate.dtype)
    if policy_mask is not None:
        surrogate = surrogate * policy_mask.to(surrogate.dtype)
    agg = dict(mask=mask, loss_type=loss_type, max_completion_length=max_completion_length,
               num_items_in_batch=num_items_in_batch, counts=counts)
    policy_loss = aggregate(surrogate, **agg)
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("ref_logprobs is required when beta != 0")
        delta = ref_logprobs - logprobs
        kl = torch.exp(delta) - delta - 1
        kl_loss = beta * aggregate(kl, **agg)
        mean_kl = masked_mean(kl.detach(), mask)
    else:
        kl_loss = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
        mean_kl = torch.zeros_like(kl_loss)
    loss = policy_loss + kl_loss
    entropy_loss = None
    if entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("entropy is required when entropy_coef != 0")
        entropy_loss = -entropy_coef * aggregate(entropy.to(logprobs.dtype), **agg)
        loss = loss + entropy_loss
    with torch.no_grad():
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(mask.dtype)
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(mask.dtype)
        metrics = {
            "grpo_loss": loss.detach(),
            "policy_loss": policy_loss.detach(),
            "kl_loss": kl_loss.detach(),
            "kl": mean_kl,
            "clip_ratio_low": masked_mean(low, mask),
            "clip_ratio_high": masked_mean(high, mask),
            "clip_ratio_region": masked_mean(torch.maximum(low, high), mask),
            **drift,
        }
        if entropy_loss is not None:
            metrics["entropy_loss"] = entropy_loss.detach()
    return loss, metrics if as_tensors else {k: v.item() for k, v in metrics.items()}


if __name__ == "__main__":
    print(loss_types_markdown())
