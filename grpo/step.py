"""One GRPO step, as the algorithm box reads (`grpo_step`).

    prompts <- this rank's share of the step's questions
    1. rollout: G = num_generations completions per prompt (temperature, top_p, stop at end-of-turn)
    2. rewards r <- numeric_reward(completions, answers); A <- group_advantages(r of every rank, G)
    3. old logprobs (only when num_iterations > 1) and reference logprobs (only when beta > 0), no grad
    4. num_iterations times: per micro-batch, loss <- grpo_loss(logp, old, ref, A); backward (gradients
       accumulate); clip the gradient norm (logged before clipping); AdamW step; LR schedule

Where we depart from the paper's GRPO (Shao et al., 2024, DeepSeekMath), and why:
- Loss aggregation `dapo` by default: the token sum over the completion tokens of the whole step
  (DAPO, Yu et al., 2025). The paper's mean of per-sequence means (`--loss_type grpo`) gives a token of
  a short completion more weight than one of a long completion, so long wrong answers are punished
  less per token; `dapo` weighs every token alike and accumulates exactly over micro-batches and ranks.
- KL by the k3 estimator exp(ref - logp) - (ref - logp) - 1, per token, as the paper, but on the
  tokens' own log-probs (no full-vocabulary KL), with beta 0.01 by default (the paper: 0.04); `--beta 0`
  drops the reference model and its pass (as DAPO and Dr. GRPO do).
- Advantages (r - mean) / (std + 1e-4) within each group: the epsilon keeps an all-equal group at
  exactly 0 instead of 0/0; `--scale_rewards none` is Dr. GRPO's unscaled version.
- Log-probs at the sampling temperature (log softmax(logits / T)), as TRL: the ratio and the KL are
  those of the distribution the completions were drawn from.
- One update per rollout by default (`num_iterations` 1, so the ratio is exactly 1 and the clip never
  binds); the paper's several updates per batch are `--num_iterations`.
- `--mask_truncated_completions` (off by default) takes completions cut at the length limit out of the
  loss and out of every normalizer, rows included (TRL zeroes their tokens but still counts them in
  grpo's mean over rows); they keep their rewards in the group's statistics.
- Rollouts cut by `--top_p`/`--top_k`/`--min_p` are off-policy: the loss uses the whole softmax at the
  temperature, while the engine drew from the renormalized cut (its log-probs are the cut's), so the
  logged sampler ratio is the kept mass (< 1) on every token; `--rollout_correction *_truncate` weighs
  each token by it (docs/training.md).
- The rollout engine is a second implementation of the forward (bf16 decode on CUDA, CUDA graphs): its
  log-probs are measured against the trainer's every step (sampler_* in the log) and, with
  `--rollout_correction`, corrected by truncated or masked importance sampling (TRL's, verl's).

Under torchrun each rank takes prompts_per_step / W prompts (a group never spans ranks); rewards are
gathered so advantages and metrics are the whole batch's, and each micro-batch's loss is scaled so
DDP's averaged gradient equals the single-process gradient on the same completions.

Around it: groups.py (1-2: completions, rewards, dynamic sampling), loss.py (the loss and the table of
loss types, which says how micro-batches add up), prompt_order.py (which prompts), record.py (the
log line), policy.py (what the step trains), trainer.py (the run).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from common.distributed import Dist, no_sync_unless
from common.timing import Timer
from grpo.batch import RolloutBatch, completion_logprobs, pack
from grpo.config import GRPOConfig
from grpo.groups import completion_rows, dynamic_groups, thinking_spans
from grpo.loss import (
    DRIFT_MAXES,
    DRIFT_SUMS,
    LOSS_TYPES_TABLE,
    Counts,
    group_advantages,
    grpo_loss,
    high_entropy_mask,
)
from grpo.policy import Policy
from grpo.record import StepStats, completion_groups
from rewards.functions import TrainerState

LOSS_METRICS = ("grpo_loss", "policy_loss", "kl_loss", "entropy_loss")  # summed with the loss weights; others by tokens


@torch.no_grad()
def logprobs_no_grad(model: Any, batch: RolloutBatch, micro: int, temperature: float, autocast: Any) -> torch.Tensor:
    out = []
    for s in range(0, batch.input_ids.shape[0], micro):
        mb = batch.take(slice(s, s + micro))
        with autocast():
            logp = completion_logprobs(model, mb, temperature)[0]
        out.append(torch.nn.functional.pad(logp, (0, batch.completion_width - mb.completion_width)))
    return torch.cat(out)


def reference_logprobs(model: Any, ref_model: Any, batch: RolloutBatch, micro: int, temperature: float,
                       autocast: Any) -> torch.Tensor:
    """Logprobs under the frozen reference: `ref_model`, or with LoRA (ref_model None) the same model
    with its adapter switched off, so no second copy of the weights is held."""
    if ref_model is None:
        with model.disable_adapter():
            return logprobs_no_grad(model, batch, micro, temperature, autocast)
    return logprobs_no_grad(ref_model, batch, micro, temperature, autocast)


def micro_batch_backward(train_model: Any, mb: RolloutBatch, old_logprobs: torch.Tensor | None,
                         ref_logprobs: torch.Tensor | None, advantages: torch.Tensor, cfg: GRPOConfig,
                         counts: Counts | None, scale: float, sync: bool,
                         autocast: Any) -> tuple[dict[str, float], float]:
    """Loss of one micro-batch, normalized by the step's `counts`, times `scale`, and its backward (gradients
    accumulate; DDP all-reduces only when `sync`);
    returns (grpo_loss's metrics, the summed entropy of its completion tokens), read from the device in
    one transfer after the backward is queued. No [rows, C, V] logits
    are held: the loss projects the hidden states a chunk at a time (`completion_logprobs`); on the
    logits path they are never bound to a name, so they are freed once the log-prob pass's backward
    has used them, not held through the model's whole backward."""
    with no_sync_unless(train_model, sync=sync):
        with autocast():
            logp, entropy = completion_logprobs(train_model, mb, cfg.temperature, with_entropy=True,
                                                entropy_grad=cfg.entropy_coef != 0.0)
        entropy_terms = entropy_options(cfg, entropy, mb.completion_mask)  # {} at the defaults
        loss, metrics = grpo_loss(logp, old_logprobs, ref_logprobs, advantages, mb.completion_mask, beta=cfg.beta,
                                  epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                                  loss_type=cfg.loss_type, max_completion_length=cfg.max_completion_length,
                                  importance_sampling_level=cfg.importance_sampling_level, counts=counts,
                                  as_tensors=True, sampler_logprobs=mb.sampler_logprobs,
                                  rollout_correction=cfg.rollout_correction,
                                  rollout_correction_cap=cfg.rollout_correction_cap,
                                  **entropy_terms)
        (loss * scale).backward()
    # every figure of the micro-batch read back at once, after the backward is queued: one sync
    *values, entropy_sum = torch.stack([*metrics.values(), (entropy.detach() * mb.completion_mask).sum()]).tolist()
    return dict(zip(metrics, values)), entropy_sum


def entropy_options(cfg: GRPOConfig, entropy: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """grpo_loss's entropy arguments: --top_entropy_quantile's mask of high-entropy tokens (below 1.0) and
    --entropy_coef's bonus (not 0); none at the defaults, so the default loss is today's, bit for bit."""
    out: dict[str, Any] = {}
    if cfg.top_entropy_quantile < 1.0:
        out["policy_mask"] = high_entropy_mask(entropy, mask, cfg.top_entropy_quantile)
    if cfg.entropy_coef != 0.0:
        out.update(entropy=entropy, entropy_coef=cfg.entropy_coef)
    return out


def no_grad_micro_batch(cfg: GRPOConfig, device: str) -> int:
    """Rows per pass of the no-grad log-prob passes: nothing is kept for a backward there, so on CUDA
    they take 4x the training micro-batch (fewer, fuller launches); on the CPU the same (its results
    stay as they were)."""
    if cfg.no_grad_micro_batch_size:
        return cfg.no_grad_micro_batch_size
    return cfg.micro_batch_size * (4 if device.startswith("cuda") else 1)


def trained_rows(s: int, end: int, advantages: list[float], skip: bool, live: list[bool] | None = None) -> list[int]:
    """The rows of micro-batch [s, end) that go through the forward and backward: all of them, or with
    `skip` only those whose advantage is not 0 (with beta 0 a row's whole gradient is A x d ratio, so
    a row with A = 0, e.g. every row of a group whose rewards are all equal, contributes exactly 0);
    with `live` only the rows still in the loss (--mask_truncated_completions takes cut ones out).
    Decided on the host, from host copies: no device read."""
    return [r for r in range(s, end) if (live is None or live[r]) and (not skip or advantages[r] != 0)]


def _index(rows: list[int], device: str) -> torch.Tensor:
    """`rows` as a device index; on CUDA through pinned memory, so the copy does not wait for the GPU."""
    index = torch.tensor(rows, dtype=torch.long)
    return index.pin_memory().to(device, non_blocking=True) if device.startswith("cuda") else index.to(device)


def _optimizer_step(policy: Policy, cfg: GRPOConfig, dist: Dist, loss: float) -> tuple[float, bool, float]:
    """Clip, step (every rank, or none when any rank's loss or norm is not finite), schedule:
    (grad norm before clipping, whether the update was skipped, the learning rate it used)."""
    params = [p for p in policy.model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
    finite = torch.tensor(float(math.isfinite(grad_norm) and math.isfinite(loss)), device=policy.device)
    skipped = dist.all_reduce(finite, "min").item() != 1.0
    if not skipped:
        policy.optimizer.step()
    policy.optimizer.zero_grad(set_to_none=True)
    lr = policy.scheduler.get_last_lr()[0]
    policy.scheduler.step()
    return grad_norm, skipped, lr


def grpo_step(policy: Policy, cfg: GRPOConfig, dist: Dist, records: list[dict[str, Any]], step: int,
              rollout_hook: Any = None, draw_more: Any = None, state: TrainerState | None = None) -> StepStats:
    """One step (0-based `step`) on this rank's `records` (its share of the step's prompts); see the module
    docstring. `draw_more(attempt)` gives further prompts for --dynamic_sampling; `state` is what the
    rewards get as `trainer_state` (default: this step of --max_steps, epoch 0)."""
    timer, G, device = Timer(policy.device), cfg.num_generations, policy.device
    state = state or TrainerState(step, cfg.max_steps or 0, 0.0)
    # 1. rollout and 2. rewards (with --dynamic_sampling, until the groups carry a signal)
    groups, extra, sampled = dynamic_groups(policy, cfg, dist, records, state, rollout_hook, draw_more, timer)
    policy.model.train()
    everything = dist.all_gather(groups.scores.to(device).contiguous()).cpu()  # [W * B, rewards], rank 0's first
    rewards = policy.reward_sum(everything)
    parts = {n: everything[:, i] for i, (n, _, _) in enumerate(policy.rewards)}
    all_advantages = group_advantages(rewards, G, cfg.scale_rewards)  # over the whole step's batch (all ranks)
    completions, B, W = groups.completions, len(groups.completions), dist.world_size
    mine = all_advantages[dist.rank * B: (dist.rank + 1) * B]
    advantages = mine.to(device)
    batch = pack([p for p in groups.prompts for _ in range(G)], completions, policy.tokenizer.pad_token_id, device,
                 groups.sampler_logprobs)
    if cfg.mask_truncated_completions:  # cut rows keep their rewards above, but leave the loss and normalizers
        batch.mask_rows(groups.truncated)
    # the micro-batches are cut and counted on the host, from host copies: no device read per micro-batch
    lengths, adv_host = batch.completion_lengths, mine.tolist()
    live_host = [n > 0 for n in lengths]  # the rows in the loss
    # the step's completion tokens (dapo's normalizer) and rows in the loss (grpo's, dr_grpo's), all ranks
    num_items, step_rows = dist.all_reduce(torch.tensor([float(sum(lengths)), float(sum(live_host))],
                                                        device=device)).tolist()
    num_items, step_rows = max(num_items, 1.0), int(step_rows)

    policy.sampler.before_backward()  # the graphed decode state is freed unless measured to fit beside it
    with timer("reference"):  # 3. old (only when the rollout is reused) and reference logprobs
        micro, T, wide = cfg.micro_batch_size, cfg.temperature, no_grad_micro_batch(cfg, device)
        old = logprobs_no_grad(policy.model, batch, wide, T, policy.autocast) if cfg.num_iterations > 1 else None
        ref = (reference_logprobs(policy.model, policy.ref_model, batch, wide, T, policy.autocast)
               if cfg.beta != 0.0 else None)

    sums: dict[str, float] = {}
    drift_sums, drift_max = dict.fromkeys(DRIFT_SUMS, 0.0), dict.fromkeys(DRIFT_MAXES, -math.inf)
    entropy_sum, entropy_tokens, backward_rows, skipped = 0.0, 0.0, 0, 0
    # rows with advantage 0 still carry a gradient with a KL term or an entropy bonus, and count in the
    # entropy mask's quantile (over the micro-batch, as TRL takes it); under DDP every rank runs every backward
    skip = (cfg.skip_zero_advantage and cfg.beta == 0.0 and cfg.entropy_coef == 0.0
            and cfg.top_entropy_quantile == 1.0 and W == 1)
    drop = live_host if W == 1 else None  # rows out of the loss skip the backward too (under DDP they run, at 0)
    loss_type = LOSS_TYPES_TABLE[cfg.loss_type]
    went_through = torch.zeros(B, dtype=torch.bool)  # the rows of any update's backward (completions.jsonl)
    for _ in range(cfg.num_iterations):  # 4. updates on this rollout, micro-batched
        with timer("backward"):
            for s in range(0, B, micro):
                trained = trained_rows(s, min(s + micro, B), adv_host, skip, drop)
                if not trained:
                    continue  # no row of it carries a gradient
                index = _index(trained, device)
                mb = batch.take(index, trained)  # cut to its own widths: completion columns [:w] of the batch
                full = sum(live_host[s: s + micro])  # rows in the loss; of them trained: all (DDP) or `trained`
                kept = len(trained) if drop is not None else full
                # the loss type's weight makes the micro-batches add up to the step's loss (loss.py's table)
                weight = loss_type.weight(kept, full, step_rows)
                counts = Counts(tokens=max(sum(lengths[s: s + micro]), 1.0), max_length=cfg.max_completion_length,
                                step_tokens=num_items)
                w = mb.completion_width
                metrics, entropy = micro_batch_backward(
                    policy.train_model, mb, None if old is None else old[index, :w],
                    None if ref is None else ref[index, :w], advantages[index], cfg, counts, weight * W,
                    sync=s + micro >= B, autocast=policy.autocast)
                tokens = sum(mb.completion_lengths)
                for k, v in metrics.items():  # this rank's share; summed over ranks at log time
                    if k in drift_sums:  # the sampler's drift: plain sums and maxima (loss.py's sampler_drift)
                        drift_sums[k] += v
                    elif k in drift_max:
                        drift_max[k] = max(drift_max[k], v)
                    else:
                        sums[k] = sums.get(k, 0.0) + v * (weight if k in LOSS_METRICS else tokens / num_items)
                entropy_sum, entropy_tokens = entropy_sum + entropy, entropy_tokens + tokens
                backward_rows += len(trained)
                went_through[trained] = True
        with timer("optimizer"):
            grad_norm, was_skipped, lr = _optimizer_step(policy, cfg, dist, sums.get("grpo_loss", 0.0))
            skipped += was_skipped
    logged = None
    if completion_groups(cfg) != 0:
        mine = slice(dist.rank * B, (dist.rank + 1) * B)
        logged = completion_rows(policy, groups, step + 1, rewards[mine], all_advantages[mine], went_through.tolist(),
                                 completion_groups(cfg))
    return StepStats(sums=sums, entropy_sum=entropy_sum, entropy_tokens=entropy_tokens, backward_rows=backward_rows,
                     num_items=num_items, rewards=rewards, reward_parts=parts, advantages=all_advantages,
                     lengths=[len(c) for c in completions], truncated=groups.truncated, grad_norm=grad_norm,
                     prompt_lengths=[len(p) for p in groups.prompts for _ in range(G)],
                     skipped=skipped, learning_rate=lr, times=timer.totals, extra_rollouts=extra,
                     prompts_sampled=sampled, masked_rows=B - sum(live_host),
                     thinking=thinking_spans(policy, completions), completions_log=logged,
                     drift_sums=drift_sums, drift_max=drift_max)
