"""A GRPO step's log line (`step_record`) from what one rank measured (`StepStats`, its backward passes'
`Tally`): metrics over every rank's completions, times and memory of the slowest rank."""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass, field
from typing import Any

import torch

from common.distributed import Dist
from data.prompt import thinking_fields
from grpo.config import GRPOConfig
from grpo.groups import has_signal
from grpo.loss import DRIFT_MAXES, DRIFT_SUMS
from grpo.plan import MicroBatch

# loss metrics sum with their micro-batch's weight (so they add up as the loss does); the others are
# token means, summed with the micro-batch's share of the step's tokens
LOSS_METRICS = ("grpo_loss", "policy_loss", "kl_loss", "entropy_loss")


@dataclass
class Tally:
    """What one rank's backward passes measured, summed in their order over its micro-batches and the
    --num_iterations updates: grpo_loss's metrics (each its share of the step's value), the sampler's
    drift (grpo.loss.sampler_drift: sums, and maxima), the entropy of the tokens that went through a
    forward (rows skipped for a zero advantage did not) and the rows that did."""

    sums: dict[str, float] = field(default_factory=dict)
    drift_sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(DRIFT_SUMS, 0.0))
    drift_max: dict[str, float] = field(default_factory=lambda: dict.fromkeys(DRIFT_MAXES, -math.inf))
    entropy_sum: float = 0.0
    entropy_tokens: float = 0.0
    backward_rows: int = 0

    def add(self, metrics: dict[str, float], entropy_sum: float, part: MicroBatch, step_tokens: float) -> None:
        """One micro-batch's figures (grpo_loss's metrics, its tokens' summed entropy)."""
        for k, v in metrics.items():
            if k in self.drift_sums:
                self.drift_sums[k] += v
            elif k in self.drift_max:
                self.drift_max[k] = max(self.drift_max[k], v)
            else:
                self.sums[k] = self.sums.get(k, 0.0) + v * (part.weight if k in LOSS_METRICS
                                                            else part.tokens / step_tokens)
        self.entropy_sum, self.entropy_tokens = self.entropy_sum + entropy_sum, self.entropy_tokens + part.tokens
        self.backward_rows += len(part.rows)


@dataclass
class StepStats:
    """One rank's step: its backward passes' tally, all ranks' rewards and advantages, its completions'
    lengths, and the phases' seconds. Built by keyword."""

    tally: Tally
    rewards: torch.Tensor  # the weighted sum of the reward functions, all ranks' completions
    reward_parts: dict[str, torch.Tensor]  # each reward function's values, all ranks' completions
    advantages: torch.Tensor
    lengths: list[int]
    truncated: list[bool]
    prompt_lengths: list[int]  # per completion: its prompt's tokens (the step's widths set its memory)
    grad_norm: float
    skipped: int
    learning_rate: float
    times: dict[str, float]
    extra_rollouts: int = 0  # --dynamic_sampling's further rollouts this step
    prompts_sampled: int = 0  # this rank's prompts rolled out, the extra ones included
    masked_rows: int = 0  # this rank's rows out of the loss (--mask_truncated_completions)
    thinking: list[tuple[int, bool]] | None = None  # per completion (thinking tokens, closed) when thinking is on
    completions_log: list[dict[str, Any]] | None = None  # completions.jsonl's lines of this rank (--log_completions)


def peak_memory_gb(device: str) -> tuple[float, float]:
    """(peak allocated, peak reserved by the caching allocator) on CUDA; the peak RSS twice on the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    return rss, rss


def step_record(stats: StepStats, cfg: GRPOConfig, dist: Dist, device: str, time_per_step: float) -> dict[str, Any]:
    """The log line's step metrics over all ranks' completions; times and memory of the slowest rank."""
    phases = ("generation", "backward", "reference", "optimizer", "reward")
    tally = stats.tally
    drift_sums, drift_max = tally.drift_sums, tally.drift_max
    slowest = dist.all_reduce(torch.tensor([time_per_step, *(stats.times.get(p, 0.0) for p in phases),
                                            *peak_memory_gb(device), *(drift_max[k] for k in DRIFT_MAXES)],
                                           device=device, dtype=torch.float64), "max")
    time_per_step, *phase_times, peak, reserved = slowest.tolist()[: len(phases) + 3]
    maxima = dict(zip(DRIFT_MAXES, slowest.tolist()[len(phases) + 3:]))
    times = dict(zip(phases, phase_times))
    keys = sorted(tally.sums)
    summed = dist.all_reduce(torch.tensor([tally.sums[k] for k in keys] + [tally.entropy_sum, tally.entropy_tokens,
                                          tally.backward_rows, stats.prompts_sampled, stats.masked_rows]
                                          + [drift_sums[k] for k in DRIFT_SUMS],
                                          device=device, dtype=torch.float64)).tolist()
    drift = dict(zip(DRIFT_SUMS, summed[len(summed) - len(DRIFT_SUMS):]))
    *summed, entropy_tokens, backward_rows, prompts_sampled, masked_rows = summed[: len(summed) - len(DRIFT_SUMS)]
    spans = stats.thinking or [(0, True)] * len(stats.lengths)
    per_completion = torch.tensor([[n, t, th, closed, p] for n, t, (th, closed), p in
                                   zip(stats.lengths, stats.truncated, spans, stats.prompt_lengths)], device=device)
    lengths, truncated, thinking, closed, prompt_lengths = dist.all_gather(per_completion).cpu().T.tolist()
    think_fields = {} if stats.thinking is None else thinking_fields(list(zip(thinking, closed)))
    n_iter, rewards, advantages = cfg.num_iterations, stats.rewards, stats.advantages
    return {
        **{k: v / n_iter for k, v in zip(keys, summed[:-1])},
        "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
        **{f"reward_{name}_{stat}": getattr(values[~values.isnan()], stat)().item()  # a None (NaN) is ignored
           for name, values in stats.reward_parts.items() for stat in ("mean", "std")},
        "adv_mean": advantages.mean().item(), "adv_std": advantages.std().item(),
        "grad_norm": stats.grad_norm, "learning_rate": stats.learning_rate,
        "time_per_step_s": time_per_step, "generation_time_s": times["generation"],
        "backward_time_s": times["backward"],
        "other_time_s": time_per_step - times["generation"] - times["backward"],
        "reference_time_s": times["reference"], "optimizer_time_s": times["optimizer"],
        "reward_time_s": times["reward"],
        "tokens_generated": sum(lengths), "entropy": summed[-1] / max(1.0, entropy_tokens),
        "backward_rows": int(backward_rows) // n_iter,
        "completion_len_mean": sum(lengths) / len(lengths), "completion_len_min": min(lengths),
        "completion_len_max": max(lengths),
        "prompt_len_mean": sum(prompt_lengths) / len(prompt_lengths), "prompt_len_max": max(prompt_lengths),
        "clipped_ratio": sum(truncated) / len(truncated),
        "frac_reward_zero_std": (~has_signal(rewards, cfg.num_generations)).float().mean().item(),
        "extra_rollouts": stats.extra_rollouts, "prompts_sampled": int(prompts_sampled),
        "masked_rows": int(masked_rows),
        "peak_memory_gb": peak, "peak_memory_reserved_gb": reserved, "skipped_updates": stats.skipped,
        "world_size": dist.world_size, **think_fields, **drift_fields(drift, maxima, n_iter),
    }


def drift_fields(sums: dict[str, float], maxima: dict[str, float], n_iter: int) -> dict[str, float]:
    """The log's sampler_* and rollout_correction_* fields from every rank's summed DRIFT_SUMS and
    maximal DRIFT_MAXES (grpo.loss.sampler_drift); none when no token had the sampler's log-probs (a
    rollout stand-in's completions). Counts are per update (each of --num_iterations sees the same ones)."""
    tokens = sums["sampler_tokens"]
    if tokens <= 0:
        return {}
    return {"sampler_logp_diff_mean": sums["sampler_logp_diff_sum"] / tokens,
            "sampler_logp_diff_max": maxima["sampler_logp_diff_max"],
            "sampler_kl": sums["sampler_kl_sum"] / tokens,
            "sampler_ratio_mean": sums["sampler_ratio_sum"] / tokens,
            "sampler_ratio_min": -maxima["sampler_ratio_min_negated"],
            "sampler_ratio_max": maxima["sampler_ratio_max"],
            **{k: int(round(sums[k])) // n_iter for k in ("rollout_correction_truncated_tokens",
                                                          "rollout_correction_masked_tokens",
                                                          "rollout_correction_masked_rows")}}


def completion_groups(cfg: GRPOConfig) -> int | None:
    """How many groups of a step's completions to keep rows of, for --log_completions and
    --print_completions: None for all, 0 for none."""
    if cfg.log_completions == "all":
        return None
    shown = -(-cfg.print_completions // cfg.num_generations)  # groups that hold the printed completions
    return max(int(cfg.log_completions), shown)


def shown_completions(rows: list[dict[str, Any]], step: int, width: int = 300) -> str:
    """--print_completions' console block: each completion (newlines as a visible mark, cut at `width`
    characters) under its question and gold answer, with every reward, their sum and its advantage."""
    lines = [f"completions at step {step} ({len(rows)}):"]
    for row in rows:
        parts = ", ".join(f"{k[len('reward_'):]} {'-' if v is None else f'{v:.3f}'}" for k, v in row.items()
                          if k.startswith("reward_"))
        text = row["completion"].replace("\n", " \u23ce ")
        lines.append(f"  reward {row['reward']:.3f} ({parts}), advantage {row['advantage']:+.3f}"
                     f"{', truncated' if row['truncated'] else ''} | gold {row['answer']} | {row['question'][:80]}")
        lines.append(f"    {text[:width]}{' ...' if len(text) > width else ''}")
    return "\n".join(lines)
