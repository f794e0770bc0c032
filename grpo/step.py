"""One GRPO step, as the algorithm box reads (`grpo_step`).

    prompts <- this rank's share of the step's questions
    1. rollout: G = num_generations completions per prompt (temperature, top_p, stop at end-of-turn)
    2. rewards r <- numeric_reward(completions, answers); A <- group_advantages(r of every rank, G)
    plan: which rows go in which micro-batch, with what weight and normalizers (grpo/plan.py, on the host)
    3. old logprobs (only when num_iterations > 1) and reference logprobs (only when beta > 0), no grad
    4. num_iterations times: per planned micro-batch, loss <- grpo_loss(logp, old, ref, A); backward
       (gradients accumulate); clip the gradient norm (logged before clipping); AdamW step; LR schedule

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

Around it: groups.py (1-2: completions, rewards, dynamic sampling), plan.py (the micro-batches, and
what kept, full and step_rows mean), loss.py (the loss and the table of loss types, which says how
micro-batches add up), prompt_order.py (which prompts), record.py (the log line), policy.py (what the
step trains and what rolls out), trainer.py (the run).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from common.distributed import Dist, no_sync_unless
from common.timing import Timer
from grpo.batch import RolloutBatch, completion_logprobs, pack
from grpo.config import GRPOConfig
from grpo.groups import Groups, completion_rows, dynamic_groups, thinking_spans
from grpo.loss import LossBatch, LossSettings, group_advantages, grpo_loss
from grpo.plan import StepPlan, plan_step
from grpo.policy import Policy
from grpo.record import StepStats, Tally, completion_groups
from rewards.functions import TrainerState


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


def no_grad_micro_batch(cfg: GRPOConfig, device: str) -> int:
    """Rows per pass of the no-grad log-prob passes: --no_grad_micro_batch_size, else the training
    micro-batch, times 4 on CUDA (nothing is kept for a backward there: fewer, fuller launches)."""
    if cfg.no_grad_micro_batch_size:
        return cfg.no_grad_micro_batch_size
    return cfg.micro_batch_size * (4 if device.startswith("cuda") else 1)


def fixed_logprobs(policy: Policy, cfg: GRPOConfig,
                   batch: RolloutBatch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """3 of the box, [B, C] each, no grad: the old policy's log-probs (only when the rollout is reused,
    --num_iterations > 1) and the reference's (only when beta != 0); None where not needed."""
    wide, T = no_grad_micro_batch(cfg, policy.device), cfg.temperature
    old = logprobs_no_grad(policy.model, batch, wide, T, policy.autocast) if cfg.num_iterations > 1 else None
    ref = (reference_logprobs(policy.model, policy.ref_model, batch, wide, T, policy.autocast)
           if cfg.beta != 0.0 else None)
    return old, ref


def step_advantages(policy: Policy, cfg: GRPOConfig, dist: Dist,
                    groups: Groups) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """2 of the box over every rank's completions (rank 0's first): (their rewards, each reward
    function's values, their advantages), on the host."""
    everything = dist.all_gather(groups.scores.to(policy.device).contiguous()).cpu()  # [W * B, rewards]
    rewards = policy.reward_sum(everything)
    parts = {n: everything[:, i] for i, (n, _, _) in enumerate(policy.rewards)}
    return rewards, parts, group_advantages(rewards, cfg.num_generations, cfg.scale_rewards)


def plan_update(cfg: GRPOConfig, settings: LossSettings, dist: Dist, batch: RolloutBatch,
                advantages: list[float]) -> StepPlan:
    """This rank's micro-batches (grpo/plan.py) from host copies, with the step's totals over every rank:
    its completion tokens (dapo's normalizer) and rows in the loss (grpo's, dr_grpo's)."""
    lengths = batch.completion_lengths
    step_tokens, step_rows = dist.all_reduce(torch.tensor([float(sum(lengths)), float(sum(n > 0 for n in lengths))],
                                                          device=batch.input_ids.device)).tolist()
    return plan_step(lengths, advantages, cfg.loss_type, cfg.micro_batch_size,
                     max_completion_length=cfg.max_completion_length, world_size=dist.world_size,
                     skip_zero_advantage=cfg.skip_zero_advantage and settings.zero_advantage_adds_nothing,
                     step_tokens=step_tokens, step_rows=int(step_rows))


def micro_batch_backward(train_model: Any, mb: RolloutBatch, inputs: LossBatch, settings: LossSettings,
                         temperature: float, scale: float, sync: bool, autocast: Any) -> tuple[dict[str, float], float]:
    """Loss of one micro-batch `mb` (`inputs`: its tensors, the step's normalizers in `inputs.counts`),
    times `scale`, and its backward (gradients accumulate; DDP all-reduces only when `sync`); returns
    (grpo_loss's metrics, the summed entropy of its completion tokens), read from the device in one
    transfer after the backward is queued. No [rows, C, V] logits are held: the loss projects the hidden
    states a chunk at a time (`completion_logprobs`); on the logits path they are never bound to a name,
    so they are freed once the log-prob pass's backward has used them, not held through the model's
    whole backward."""
    with no_sync_unless(train_model, sync=sync):
        with autocast():
            logp, entropy = completion_logprobs(train_model, mb, temperature, with_entropy=True,
                                                entropy_grad=settings.entropy_coef != 0.0)
        loss, metrics = grpo_loss(logp, replace(inputs, entropy=entropy), settings, as_tensors=True)
        (loss * scale).backward()
    # every figure of the micro-batch read back at once, after the backward is queued: one sync
    *values, entropy_sum = torch.stack([*metrics.values(), (entropy.detach() * mb.completion_mask).sum()]).tolist()
    return dict(zip(metrics, values)), entropy_sum


def run_update(policy: Policy, settings: LossSettings, temperature: float, batch: RolloutBatch,
               tensors: LossBatch, plan: StepPlan, tally: Tally) -> None:
    """One update's forward and backward passes over `batch`, as `plan` cuts them; `tensors`: the loss's
    tensors of the whole batch. What each micro-batch measured goes to `tally`."""
    for part in plan.micro_batches:
        index = _index(part.rows, policy.device)
        mb = batch.take(index, part.rows)  # cut to its own widths: completion columns [:w] of the batch
        inputs = tensors.take(index, mb.completion_width, part.counts)
        metrics, entropy = micro_batch_backward(policy.train_model, mb, inputs, settings, temperature, part.scale,
                                                part.sync, policy.autocast)
        tally.add(metrics, entropy, part, plan.step_tokens)


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
              draw_more: Any = None, state: TrainerState | None = None) -> StepStats:
    """One step (0-based `step`) on this rank's `records` (its share of the step's prompts); see the module
    docstring. `draw_more(attempt)` gives further prompts for --dynamic_sampling; `state` is what the
    rewards get as `trainer_state` (default: this step of --max_steps, epoch 0)."""
    timer, G, device = Timer(policy.device), cfg.num_generations, policy.device
    state = state or TrainerState(step, cfg.max_steps or 0, 0.0)
    # 1. rollout and 2. rewards (with --dynamic_sampling, until the groups carry a signal)
    groups, extra, sampled = dynamic_groups(policy, cfg, dist, records, state, draw_more, timer)
    policy.model.train()
    rewards, parts, all_advantages = step_advantages(policy, cfg, dist, groups)  # over every rank's completions
    B = len(groups.completions)
    mine = slice(dist.rank * B, (dist.rank + 1) * B)
    batch = pack([p for p in groups.prompts for _ in range(G)], groups.completions, policy.tokenizer.pad_token_id,
                 device, groups.sampler_logprobs)
    if cfg.mask_truncated_completions:  # cut rows keep their rewards above, but leave the loss and normalizers
        batch.mask_rows(groups.truncated)
    settings = LossSettings.from_config(cfg)
    plan = plan_update(cfg, settings, dist, batch, all_advantages[mine].tolist())  # the host's copy

    policy.sampler.before_backward()  # the graphed decode state is freed unless measured to fit beside it
    with timer("reference"):  # 3. old (only when the rollout is reused) and reference logprobs
        old, ref = fixed_logprobs(policy, cfg, batch)
    tensors = LossBatch(all_advantages[mine].to(device), batch.completion_mask, old, ref, batch.sampler_logprobs)
    tally, skipped = Tally(), 0
    for _ in range(cfg.num_iterations):  # 4. updates on this rollout, micro-batched as planned
        with timer("backward"):
            run_update(policy, settings, cfg.temperature, batch, tensors, plan, tally)
        with timer("optimizer"):
            grad_norm, was_skipped, lr = _optimizer_step(policy, cfg, dist, tally.sums.get("grpo_loss", 0.0))
            skipped += was_skipped
    logged = None
    if completion_groups(cfg) != 0:
        logged = completion_rows(policy, groups, step + 1, rewards[mine], all_advantages[mine], plan.trained,
                                 completion_groups(cfg))
    return StepStats(tally=tally, rewards=rewards, reward_parts=parts,
                     advantages=all_advantages, lengths=[len(c) for c in groups.completions],
                     truncated=groups.truncated, prompt_lengths=[len(p) for p in groups.prompts for _ in range(G)],
                     grad_norm=grad_norm, skipped=skipped, learning_rate=lr, times=timer.totals,
                     extra_rollouts=extra, prompts_sampled=sampled, masked_rows=B - sum(plan.live),
                     thinking=thinking_spans(policy, groups.completions), completions_log=logged)
