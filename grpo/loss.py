"""GRPO loss math: pure tensor functions, no model, no I/O.

`grpo_loss(logprobs, batch, settings)`: the loss of one call from the current log-probs, the call's
tensors (`LossBatch`: old, reference and sampler log-probs, advantages, mask, ...) and the run's fixed
choices (`LossSettings`, built once from the config and checked there). `LOSS_TYPES_TABLE` says how each
`--loss_type` aggregates per-token terms and how a step's micro-batches add up to its loss (grpo/plan.py
cuts them); `group_advantages`, `sampler_drift` and `high_entropy_mask` are the step's other formulas.

Shapes: B completions (G per prompt, groups contiguous), T completion positions, V vocabulary.
`mask` [B, T] is 1 on real completion tokens (eos included) and 0 on padding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

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
    """What an aggregation divides by, when a loss call is one part of the step (None: the call's own;
    grpo/plan.py sets them per micro-batch)."""

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
    loss call (`rows`: its rows with a token); `weight(kept, full, step_rows)` multiplies a micro-batch's
    loss so the step's micro-batches sum to the step's loss (kept, full, step_rows: grpo/plan.py's words)."""

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
        lambda kept, full, step_rows: kept / max(step_rows, 1),
        "each micro-batch's mean weighted by its share of the step's completions", True,
        "GRPO paper (Shao et al., 2024)"),
    "bnpo": LossType(
        "token mean over each micro-batch", _token_mean,
        lambda kept, full, step_rows: full / max(step_rows, 1),
        "each micro-batch's token mean weighted by its share of the step's completions: the row-weighted "
        "mean of token means, so it depends on --micro_batch_size (dapo is its exact step-wide version)", False,
        "TRL's bnpo (per-device batch)"),
    "dr_grpo": LossType(
        "token sum / (completions x --max_completion_length)", _sum_over_rows_times_limit,
        lambda kept, full, step_rows: kept / max(step_rows, 1),
        "each micro-batch's value weighted by its share of the step's completions", True,
        "Dr. GRPO (Liu et al., 2025)"),
    "dapo": LossType(
        "token sum / the step's completion tokens", _sum_over_step_tokens,
        lambda kept, full, step_rows: 1.0,
        "summed: each micro-batch already divides by the whole step's tokens", True,
        "DAPO (Yu et al., 2025); the default"),
}
LOSS_TYPES = tuple(LOSS_TYPES_TABLE)


@dataclass(frozen=True)
class LossSettings:
    """What `grpo_loss` computes, fixed for a run: each field is the GRPOConfig flag of its name
    (`from_config`; `epsilon_low` is --epsilon). Choices and ranges are checked where it is made."""

    beta: float  # KL coefficient; 0 needs no reference log-probs
    epsilon_low: float = 0.2
    epsilon_high: float | None = None  # None: epsilon_low
    loss_type: str = "dapo"  # LOSS_TYPES_TABLE
    max_completion_length: int | None = None  # dr_grpo's normalizer (None: the call's width)
    importance_sampling_level: str = "token"  # IS_LEVELS
    rollout_correction: str = "none"  # ROLLOUT_CORRECTIONS
    rollout_correction_cap: float = 2.0
    entropy_coef: float = 0.0  # the entropy bonus's coefficient
    top_entropy_quantile: float = 1.0  # the share of each call's tokens that keep their surrogate

    def __post_init__(self) -> None:
        for name, choices in (("loss_type", LOSS_TYPES), ("importance_sampling_level", IS_LEVELS),
                              ("rollout_correction", ROLLOUT_CORRECTIONS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        # the ranges of the flags of the same names (grpo/config.py), for settings made from Python
        for name, ok, rule in (("beta", self.beta >= 0, ">= 0"),
                               ("epsilon_low", 0 < self.epsilon_low <= 1, "in (0, 1]"),
                               ("epsilon_high", self.epsilon_high is None or self.epsilon_high > 0, "> 0 or None"),
                               ("rollout_correction_cap", self.rollout_correction_cap > 0, "> 0"),
                               ("top_entropy_quantile", 0.0 < self.top_entropy_quantile <= 1.0, "in (0, 1]")):
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

    @classmethod
    def from_config(cls, cfg: Any) -> LossSettings:
        """The settings of a GRPOConfig (grpo/config.py)."""
        return cls(beta=cfg.beta, epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type,
                   max_completion_length=cfg.max_completion_length,
                   importance_sampling_level=cfg.importance_sampling_level,
                   rollout_correction=cfg.rollout_correction, rollout_correction_cap=cfg.rollout_correction_cap,
                   entropy_coef=cfg.entropy_coef, top_entropy_quantile=cfg.top_entropy_quantile)

    @property
    def eps_high(self) -> float:
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high

    @property
    def zero_advantage_adds_nothing(self) -> bool:
        """Whether a row with advantage 0 adds exactly 0 to the loss and its gradient (with beta 0 a row's
        gradient is A x d ratio): not with a KL term or an entropy bonus, nor when its tokens count in
        the entropy quantile (taken over the call's tokens, as TRL takes it)."""
        return self.beta == 0.0 and self.entropy_coef == 0.0 and self.top_entropy_quantile == 1.0


@dataclass
class LossBatch:
    """The tensors of one `grpo_loss` call (tiny-grpo's `Experience`): B completions, T positions."""

    advantages: torch.Tensor  # [B]
    mask: torch.Tensor  # [B, T]: 1 on the tokens in the loss
    old_logprobs: torch.Tensor | None = None  # [B, T] the ratio's denominator; None: on-policy
    ref_logprobs: torch.Tensor | None = None  # [B, T] the reference's, for the KL term (beta != 0)
    sampler_logprobs: torch.Tensor | None = None  # [B, T] as the rollout engine drew the tokens
    entropy: torch.Tensor | None = None  # [B, T] the tokens' entropy (entropy_coef, top_entropy_quantile)
    counts: Counts | None = None  # the step's normalizers when the call is one micro-batch of it

    def take(self, index: torch.Tensor, width: int, counts: Counts | None = None) -> LossBatch:
        """Rows `index`, positions [:width] (a micro-batch's), normalized by `counts`."""
        def cut(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[index, :width]

        return LossBatch(self.advantages[index], cut(self.mask), cut(self.old_logprobs), cut(self.ref_logprobs),
                         cut(self.sampler_logprobs), cut(self.entropy), counts)

    def needs(self, name: str, because: str) -> torch.Tensor:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"LossBatch.{name} is required when {because}: pass it, or change that setting")
        return value


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


def grpo_loss(logprobs: torch.Tensor, batch: LossBatch, settings: LossSettings,
              as_tensors: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
    """Clipped surrogate plus beta * k3 KL to the reference, aggregated by `settings.loss_type`, from the
    current policy's `logprobs` [B, T] (with their gradient) and the call's `batch`.

    Per token: r = exp(logp - old); surrogate = -min(r*A, clamp(r, 1-eps_low, 1+eps_high)*A);
    importance_sampling_level "sequence" (GSPO, Zheng et al. 2025) uses one ratio per completion,
    r = exp(mean over its tokens of (logp - old)), for every token of it (the gradient still flows
    through each token's logp); KL = exp(ref - logp) - (ref - logp) - 1; loss = surrogate + beta*KL.
    `batch.old_logprobs` None is on-policy (logp.detach(), so r == 1 with the policy gradient's value).
    With `batch.sampler_logprobs` the metrics hold `sampler_drift`'s figures against `old` (DRIFT_SUMS,
    DRIFT_MAXES), and a `rollout_correction` (not "none") multiplies each token's surrogate (the policy
    term, not the KL) by its detached weight before the aggregation, so every loss type and
    importance-sampling level takes it and the micro-batches still add up as the table says.
    `top_entropy_quantile` < 1: only the tokens `high_entropy_mask` keeps of `batch.entropy` keep their
    surrogate; the KL term and every normalizer still count all of the mask's tokens (as TRL does).
    `entropy_coef` != 0: the loss subtracts entropy_coef times `batch.entropy` (differentiable),
    aggregated like the surrogate (an exploration bonus), logged as `entropy_loss` (negative for a bonus).

    Returns (loss, metrics): grpo_loss == policy_loss + kl_loss (+ entropy_loss); kl is the masked token
    mean of KL; clip_ratio_* the shares of tokens clipped. `as_tensors`: the metrics as 0-dim tensors, so
    the caller reads them all at once (each `.item()` is a device sync)."""
    s, mask = settings, batch.mask.to(logprobs.dtype)
    old = logprobs.detach() if batch.old_logprobs is None else batch.old_logprobs
    adv = batch.advantages.to(logprobs.dtype).unsqueeze(1)
    log_ratio = logprobs - old
    if s.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)
    ratio = torch.exp(log_ratio).expand_as(logprobs)
    surrogate = -torch.min(ratio * adv, torch.clamp(ratio, 1 - s.epsilon_low, 1 + s.eps_high) * adv)
    drift: dict[str, torch.Tensor] = {}
    if batch.sampler_logprobs is not None:
        weights, drift = sampler_drift(old.detach(), batch.sampler_logprobs, mask, s.rollout_correction,
                                       s.rollout_correction_cap)
        if weights is not None:
            surrogate = surrogate * weights.to(surrogate.dtype)
    if s.top_entropy_quantile < 1.0:
        keep = high_entropy_mask(batch.needs("entropy", "top_entropy_quantile < 1"), mask, s.top_entropy_quantile)
        surrogate = surrogate * keep.to(surrogate.dtype)
    counts = batch.counts or Counts()
    agg = dict(mask=mask, loss_type=s.loss_type,
               counts=counts if counts.max_length is not None else replace(counts, max_length=s.max_completion_length))
    policy_loss = aggregate(surrogate, **agg)
    if s.beta != 0.0:
        delta = batch.needs("ref_logprobs", "beta != 0") - logprobs
        kl = torch.exp(delta) - delta - 1
        kl_loss = s.beta * aggregate(kl, **agg)
        mean_kl = masked_mean(kl.detach(), mask)
    else:
        kl_loss = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
        mean_kl = torch.zeros_like(kl_loss)
    loss = policy_loss + kl_loss
    extra = {}
    if s.entropy_coef != 0.0:
        entropy_loss = -s.entropy_coef * aggregate(batch.needs("entropy", "entropy_coef != 0").to(logprobs.dtype),
                                                   **agg)
        loss, extra = loss + entropy_loss, {"entropy_loss": entropy_loss.detach()}
    with torch.no_grad():
        low = ((ratio < 1 - s.epsilon_low) & (adv < 0)).to(mask.dtype)
        high = ((ratio > 1 + s.eps_high) & (adv > 0)).to(mask.dtype)
        metrics = {"grpo_loss": loss.detach(), "policy_loss": policy_loss.detach(), "kl_loss": kl_loss.detach(),
                   "kl": mean_kl, "clip_ratio_low": masked_mean(low, mask), "clip_ratio_high": masked_mean(high, mask),
                   "clip_ratio_region": masked_mean(torch.maximum(low, high), mask), **drift, **extra}
    return loss, metrics if as_tensors else {k: v.item() for k, v in metrics.items()}


if __name__ == "__main__":
    print(loss_types_markdown())
