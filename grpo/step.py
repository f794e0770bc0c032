"""One GRPO step, as the algorithm box reads (`grpo_step`), and its log record (`step_record`).

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
- Rollouts cut by `--top_p`/`--top_k`/`--min_p` are slightly off-policy: the loss uses the whole
  softmax at the temperature.

Under torchrun each rank takes prompts_per_step / W prompts (a group never spans ranks); rewards are
gathered so advantages and metrics are the whole batch's, and each micro-batch's loss is scaled so
DDP's averaged gradient equals the single-process gradient on the same completions.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass
from typing import Any

import torch

from common.distributed import Dist, no_sync_unless
from data.prompt import DEFAULT_FORMAT, PromptFormat, thinking_fields
from grpo.batch import RolloutBatch, completion_logprobs, pack
from grpo.config import GRPOConfig
from grpo.loss import group_advantages, grpo_loss
from rewards.functions import TrainerState

LOSS_METRICS = ("grpo_loss", "policy_loss", "kl_loss")  # summed with the loss weights; others by tokens


@dataclass
class Policy:
    """What a step reads and trains: the model (sampling, saving), the module backward passes go
    through (DDP's wrapper, or the model), the frozen reference (None: LoRA's disabled adapter, or
    beta 0), the optimizer and schedule, and the CUDA-graph decode state kept across rollouts."""

    model: Any
    train_model: Any
    ref_model: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    device: str
    rewards: list[tuple[str, Any, float]]  # (name, function, weight): the advantage uses the weighted sum
    graphs: Any = False
    prompt: PromptFormat = DEFAULT_FORMAT  # how questions become prompts (data/prompt.py)

    def autocast(self) -> Any:
        from models import autocast

        return autocast(self.device)

    def reward_sum(self, scores: torch.Tensor) -> torch.Tensor:
        """The advantage's reward: [rows, reward functions] scores summed with their weights, a reward's
        None (NaN) skipped."""
        return scores.nan_to_num(0.0) @ torch.tensor([w for _, _, w in self.rewards])


@dataclass
class StepStats:
    """One rank's step: metric sums (each its share of the step's value), all ranks' rewards and
    advantages, its completions' lengths, and the phases' seconds."""

    sums: dict[str, float]
    entropy_sum: float
    entropy_tokens: float  # the tokens that went through a forward (rows skipped for a zero advantage did not)
    backward_rows: int  # rows through forward and backward, over the num_iterations updates
    num_items: float  # completion tokens of the whole step, all ranks
    rewards: torch.Tensor  # the weighted sum of the reward functions, all ranks' completions
    reward_parts: dict[str, torch.Tensor]  # each reward function's values, all ranks' completions
    advantages: torch.Tensor
    lengths: list[int]
    truncated: list[bool]
    grad_norm: float
    skipped: int
    learning_rate: float
    times: dict[str, float]
    extra_rollouts: int = 0  # --dynamic_sampling's further rollouts this step
    prompts_sampled: int = 0  # this rank's prompts rolled out, the extra ones included
    masked_rows: int = 0  # this rank's rows out of the loss (--mask_truncated_completions)
    thinking: list[tuple[int, bool]] | None = None  # per completion (thinking tokens, closed) when thinking is on


class Timer:
    """Wall-clock phases of a step; synchronizes CUDA before each reading so the split is honest."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.totals: dict[str, float] = {}

    def __call__(self, phase: str) -> Any:
        timer = self

        class _Phase:
            def __enter__(self) -> None:
                if timer.cuda:
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc: Any) -> None:
                if timer.cuda:
                    torch.cuda.synchronize()
                timer.totals[phase] = timer.totals.get(phase, 0.0) + time.perf_counter() - self.t0

        return _Phase()


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def step_prompts(step: int, n: int, per_step: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> tuple[list[int], float]:
    """This rank's dataset indices of step `step` (0-based) and the epoch the step reaches: one seeded
    global order per epoch (a step may run across the boundary into the next epoch's order), each
    step's prompts cut into world_size contiguous shards."""
    start = step * per_step
    orders: dict[int, list[int]] = {}
    indices = []
    for k in range(start, start + per_step):
        epoch = k // n
        if epoch not in orders:
            orders[epoch] = _epoch_order(n, seed, epoch)
        indices.append(orders[epoch][k % n])
    share = per_step // world_size
    return indices[rank * share: (rank + 1) * share], (start + per_step) / n


def extra_prompts(step: int, attempt: int, n: int, per_step: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> list[int]:
    """This rank's indices for --dynamic_sampling's further rollout `attempt` (1, 2, ...) of step `step`:
    a seeded draw of its own (the same on every rank, then sharded), so a resumed run draws the same
    and the epoch order is left as it is."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 101 + attempt) % 2**63)
    indices = torch.randint(n, (per_step,), generator=g).tolist()
    share = per_step // world_size
    return indices[rank * share: (rank + 1) * share]


@torch.no_grad()
def logprobs_no_grad(model: Any, batch: RolloutBatch, micro: int, temperature: float, autocast: Any) -> torch.Tensor:
    out = []
    for s in range(0, batch.input_ids.shape[0], micro):
        rows = batch.rows(slice(s, s + micro))
        with autocast():
            logp = completion_logprobs(model, rows, temperature)[0]
        out.append(torch.nn.functional.pad(logp, (0, batch.completion_width - rows.completion_width)))
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
                         num_items: float, scale: float, sync: bool, autocast: Any,
                         loss_type: str | None = None) -> tuple[dict[str, float], float]:
    """Loss of one micro-batch and its backward (gradients accumulate; DDP all-reduces only when `sync`);
    returns (grpo_loss's metrics, the summed entropy of its completion tokens). No [rows, C, V] logits
    are held: the loss projects the hidden states a chunk at a time (`completion_logprobs`); on the
    logits path they are never bound to a name, so they are freed once the log-prob pass's backward
    has used them, not held through the model's whole backward."""
    with no_sync_unless(train_model, sync=sync):
        with autocast():
            logp, entropy = completion_logprobs(train_model, mb, cfg.temperature, with_entropy=True)
        loss, metrics = grpo_loss(logp, old_logprobs, ref_logprobs, advantages, mb.completion_mask, beta=cfg.beta,
                                  epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                                  loss_type=loss_type or cfg.loss_type, max_completion_length=cfg.max_completion_length,
                                  num_items_in_batch=num_items,
                                  importance_sampling_level=cfg.importance_sampling_level)
        (loss * scale).backward()
    return metrics, (entropy * mb.completion_mask).sum().item()


def loss_weight(loss_type: str, rows: int, step_rows: int) -> float:
    """What a micro-batch's loss is multiplied by so the micro-batches add up to the step's loss.

    dapo is normalized by the step's completion tokens already (weight 1), exactly. grpo (mean of
    sequence means) and dr_grpo (sum / (rows * max length)) take the micro-batch's share of the step's
    rows, exactly as well. bnpo's token mean is over the micro-batch's own tokens (TRL's per-device
    batch): weighted by its share of rows, the step's loss is the row-weighted mean of the micro-batches'
    token means, which depends on --micro_batch_size (dapo is its exact step-wide version)."""
    return 1.0 if loss_type == "dapo" else rows / max(step_rows, 1)


def trained_rows(s: int, end: int, advantages: torch.Tensor, skip: bool,
                 live: torch.Tensor | None = None) -> torch.Tensor:
    """The rows of micro-batch [s, end) that go through the forward and backward: all of them, or with
    `skip` only those whose advantage is not 0 (with beta 0 a row's whole gradient is A x d ratio, so
    a row with A = 0, e.g. every row of a group whose rewards are all equal, contributes exactly 0);
    with `live` ([B] bool) only the rows still in the loss (--mask_truncated_completions takes cut ones out)."""
    rows = torch.arange(s, end, device=advantages.device)
    if live is not None:
        rows = rows[live[rows]]
    return rows[advantages[rows] != 0] if skip else rows


def normalizer(loss_type: str, kept: int, full: int, full_tokens: float, step_rows: int,
               num_items: float) -> tuple[str, float, float]:
    """(aggregation, its token normalizer, the loss weight) for `kept` of a micro-batch's `full` rows,
    such that the loss and gradient equal the whole micro-batch's when the others carry none: grpo and
    dr_grpo weigh the kept rows' mean by their share of the step's rows; bnpo keeps the whole
    micro-batch's token count as its normalizer (as a token sum over it); dapo is unchanged."""
    if loss_type == "bnpo":
        return "dapo", max(full_tokens, 1.0), loss_weight("bnpo", full, step_rows)
    return loss_type, num_items, loss_weight(loss_type, kept, step_rows)


def _rollout(policy: Policy, cfg: GRPOConfig, prompts: list[list[int]], answers: list[str], step: int,
             rollout_hook: Any) -> tuple[list[list[int]], list[bool]]:
    from sampling import sample

    fixed = rollout_hook(step, prompts, answers) if rollout_hook else None
    if fixed is not None:
        return fixed, [policy.tokenizer.eos_token_id not in c for c in fixed]
    tok = policy.tokenizer
    with policy.autocast():
        out = sample(policy.model, prompts, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     num_samples=cfg.num_generations, max_new_tokens=cfg.max_completion_length,
                     temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, min_p=cfg.min_p,
                     cuda_graphs=policy.graphs)
    return out.token_ids, out.truncated


def _scores(policy: Policy, cfg: GRPOConfig, records: list[dict[str, Any]], prompts: list[list[int]],
            completions: list[list[int]], truncated: list[bool], state: TrainerState) -> torch.Tensor:
    """[rows, reward functions] of this rank's completions, NaN where a reward returned None. Each
    function is called as TRL calls rewards (rewards/functions.py): prompts, completions, completion_ids,
    every column of the records, `truncated` and `trainer_state`."""
    from data.prompt import build_messages
    from rewards.functions import score

    G, tok = cfg.num_generations, policy.tokenizer
    rows = [r for r in records for _ in range(G)]
    texts = tok.batch_decode(completions, skip_special_tokens=True)
    if cfg.reward_format == "messages":
        prompt_of = [build_messages(r["question"], fmt=policy.prompt) for r in records]
        shown = [[{"role": "assistant", "content": t}] for t in texts]
    else:
        prompt_of, shown = tok.batch_decode(prompts), texts
    names = sorted({k for r in records for k in r.get("columns", {})})
    columns = {k: [r.get("columns", {}).get(k) for r in rows] for k in names}
    kwargs = {**columns, "question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows],
              "solution": [r.get("solution") for r in rows], "truncated": list(truncated),
              "prompts": [prompt_of[i // G] for i in range(len(rows))], "completions": shown,
              "completion_ids": [list(c) for c in completions], "trainer_state": state}
    scores = score([(n, fn) for n, fn, _ in policy.rewards], kwargs)
    table = torch.tensor([[math.nan if v is None else v for v in scores[n]] for n, _, _ in policy.rewards],
                         dtype=torch.float32).T
    unscored = (~table.isnan()).sum(1).eq(0).nonzero()
    if unscored.numel():
        i = int(unscored[0])
        from common.errors import fail

        fail(f"no reward scored completion {i} of question {rows[i]['question'][:60]!r}: every reward returned "
             f"None for it; give a reward that applies to every row (or a default value)")
    return table


@dataclass
class Groups:
    """This rank's sampled groups: per prompt its record and tokens; per completion its tokens, whether
    it was cut, its reward functions' scores."""

    records: list[dict[str, Any]]
    prompts: list[list[int]]
    completions: list[list[int]]
    truncated: list[bool]
    scores: torch.Tensor  # [rows, reward functions]

    def take(self, groups: list[int], G: int) -> Groups:
        rows = [g * G + k for g in groups for k in range(G)]
        return Groups([self.records[g] for g in groups], [self.prompts[g] for g in groups],
                      [self.completions[r] for r in rows], [self.truncated[r] for r in rows],
                      self.scores[rows])

    def __add__(self, other: Groups) -> Groups:
        return Groups(self.records + other.records, self.prompts + other.prompts,
                      self.completions + other.completions, self.truncated + other.truncated,
                      torch.cat([self.scores, other.scores]))


def _sample_groups(policy: Policy, cfg: GRPOConfig, records: list[dict[str, Any]], state: TrainerState,
                   rollout_hook: Any, timer: Timer) -> Groups:
    """1 and 2 of the box for `records`: G completions per prompt, and their rewards."""
    from data.prompt import encode_prompt

    prompts = [encode_prompt(policy.tokenizer, r["question"], fmt=policy.prompt) for r in records]
    with timer("generation"):
        completions, truncated = _rollout(policy, cfg, prompts, [r["answer"] for r in records], state.global_step,
                                          rollout_hook)
    with timer("reward"):
        scores = _scores(policy, cfg, records, prompts, completions, truncated, state)
    return Groups(list(records), prompts, completions, truncated, scores)


def has_signal(rewards: torch.Tensor, G: int) -> torch.Tensor:
    """Per group of G rows: whether its rewards differ (an all-equal group has advantage 0: no signal)."""
    return rewards.view(-1, G).std(dim=1) > 0


def with_signal_first(rewards: torch.Tensor, G: int, n: int) -> list[int]:
    """`n` group indices: the groups whose rewards differ (they carry a signal) in order, then, only if
    there are fewer than `n` of those, all-equal groups in order."""
    varied = has_signal(rewards, G).tolist()
    order = [g for g, v in enumerate(varied) if v] + [g for g, v in enumerate(varied) if not v]
    return order[:n]


def _dynamic_groups(policy: Policy, cfg: GRPOConfig, dist: Dist, records: list[dict[str, Any]], state: TrainerState,
                    rollout_hook: Any, draw_more: Any, timer: Timer) -> tuple[Groups, int, int]:
    """DAPO's dynamic sampling: sample further prompts (draw_more(attempt) gives this rank's next
    ones) until every rank holds as many groups with a signal as it has prompts, at most
    --max_extra_rollouts times; keep those groups first, all-equal ones only to fill what is missing.
    Returns (the groups, the extra rollouts, the prompts sampled on this rank)."""
    groups = _sample_groups(policy, cfg, records, state, rollout_hook, timer)
    extra, G, share = 0, cfg.num_generations, len(records)
    if not cfg.dynamic_sampling:
        return groups, 0, share
    while extra < cfg.max_extra_rollouts:
        signal = int(has_signal(policy.reward_sum(groups.scores), G).sum())
        if dist.all_reduce(torch.tensor(float(min(signal, share)), device=policy.device), "min").item() >= share:
            break  # every rank has enough: ranks leave the loop together, their collectives stay in step
        extra += 1
        groups = groups + _sample_groups(policy, cfg, draw_more(extra), state, rollout_hook, timer)
    sampled = len(groups.records)
    return groups.take(with_signal_first(policy.reward_sum(groups.scores), G, share), G), extra, sampled


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
    groups, extra, sampled = _dynamic_groups(policy, cfg, dist, records, state, rollout_hook, draw_more, timer)
    policy.model.train()
    everything = dist.all_gather(groups.scores.to(device).contiguous()).cpu()  # [W * B, rewards], rank 0's first
    rewards = policy.reward_sum(everything)
    parts = {n: everything[:, i] for i, (n, _, _) in enumerate(policy.rewards)}
    all_advantages = group_advantages(rewards, G, cfg.scale_rewards)  # over the whole step's batch (all ranks)
    completions, B, W = groups.completions, len(groups.completions), dist.world_size
    advantages = all_advantages[dist.rank * B: (dist.rank + 1) * B].to(device)
    batch = pack([p for p in groups.prompts for _ in range(G)], completions, policy.tokenizer.pad_token_id, device)
    if cfg.mask_truncated_completions:  # cut rows keep their rewards above, but leave the loss and normalizers
        batch.completion_mask[torch.tensor(groups.truncated, dtype=torch.bool, device=device)] = 0
    live = batch.completion_mask.any(-1)  # the rows in the loss
    live_host = live.tolist()  # counted on the host once, not per micro-batch
    num_items = dist.all_reduce(batch.completion_mask.sum().float()).clamp(min=1).item()  # dapo's normalizer
    step_rows = int(dist.all_reduce(live.sum().float()).item())  # grpo's and dr_grpo's

    with timer("reference"):  # 3. old (only when the rollout is reused) and reference logprobs
        micro, T = cfg.micro_batch_size, cfg.temperature
        old = logprobs_no_grad(policy.model, batch, micro, T, policy.autocast) if cfg.num_iterations > 1 else None
        ref = (reference_logprobs(policy.model, policy.ref_model, batch, micro, T, policy.autocast)
               if cfg.beta != 0.0 else None)

    sums: dict[str, float] = {}
    entropy_sum, entropy_tokens, backward_rows, skipped = 0.0, 0.0, 0, 0
    skip = cfg.skip_zero_advantage and cfg.beta == 0.0 and W == 1  # under DDP every rank runs every backward
    drop = live if W == 1 else None  # rows out of the loss skip the backward too (under DDP they run, at 0)
    for _ in range(cfg.num_iterations):  # 4. updates on this rollout, micro-batched
        with timer("backward"):
            for s in range(0, B, micro):
                full_mask = batch.completion_mask[s: s + micro]
                rows = trained_rows(s, min(s + micro, B), advantages, skip, drop)
                if rows.numel() == 0:
                    continue  # no row of it carries a gradient
                mb = batch.rows(rows)  # cut to its own widths: completion columns [:w] of the batch
                full = sum(live_host[s: s + micro])  # rows in the loss; of them trained: all (DDP) or `rows`
                kept = rows.numel() if drop is not None else full
                loss_type, items, weight = normalizer(cfg.loss_type, kept, full, full_mask.sum().item(), step_rows,
                                                      num_items)
                w = mb.completion_width
                metrics, entropy = micro_batch_backward(
                    policy.train_model, mb, None if old is None else old[rows, :w],
                    None if ref is None else ref[rows, :w], advantages[rows], cfg, items, weight * W,
                    sync=s + micro >= B, autocast=policy.autocast, loss_type=loss_type)
                tokens = mb.completion_mask.sum().item()
                for k, v in metrics.items():  # this rank's share; summed over ranks at log time
                    sums[k] = sums.get(k, 0.0) + v * (weight if k in LOSS_METRICS else tokens / num_items)
                entropy_sum, entropy_tokens = entropy_sum + entropy, entropy_tokens + tokens
                backward_rows += rows.numel()
        with timer("optimizer"):
            grad_norm, was_skipped, lr = _optimizer_step(policy, cfg, dist, sums.get("grpo_loss", 0.0))
            skipped += was_skipped
    return StepStats(sums, entropy_sum, entropy_tokens, backward_rows, num_items, rewards, parts, all_advantages,
                     [len(c) for c in completions], groups.truncated, grad_norm, skipped, lr, timer.totals,
                     extra, sampled, B - sum(live_host), _thinking_spans(policy, completions))


def _thinking_spans(policy: Policy, completions: list[list[int]]) -> list[tuple[int, bool]] | None:
    """Each completion's (thinking tokens, whether its think block closed), when thinking is on."""
    from data.prompt import think_close_id, thinking_span

    close_id = think_close_id(policy.tokenizer) if policy.prompt.thinking else None
    return None if close_id is None else [thinking_span(c, close_id) for c in completions]


def peak_memory_gb(device: str) -> tuple[float, float]:
    """(peak allocated, peak reserved by the caching allocator) on CUDA; the peak RSS twice on the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    return rss, rss


def step_record(stats: StepStats, cfg: GRPOConfig, dist: Dist, device: str, time_per_step: float) -> dict[str, Any]:
    """The log line's step metrics over all ranks' completions; times and memory of the slowest rank."""
    phases = ("generation", "backward", "reference", "optimizer", "reward")
    slowest = dist.all_reduce(torch.tensor([time_per_step, *(stats.times.get(p, 0.0) for p in phases),
                                            *peak_memory_gb(device)], device=device, dtype=torch.float64), "max")
    time_per_step, *phase_times, peak, reserved = slowest.tolist()
    times = dict(zip(phases, phase_times))
    keys = sorted(stats.sums)
    summed = dist.all_reduce(torch.tensor([stats.sums[k] for k in keys] + [stats.entropy_sum, stats.entropy_tokens,
                                          stats.backward_rows, stats.prompts_sampled, stats.masked_rows],
                                          device=device, dtype=torch.float64)).tolist()
    *summed, entropy_tokens, backward_rows, prompts_sampled, masked_rows = summed
    spans = stats.thinking or [(0, True)] * len(stats.lengths)
    per_completion = torch.tensor([[n, t, th, closed] for n, t, (th, closed) in
                                   zip(stats.lengths, stats.truncated, spans)], device=device)
    lengths, truncated, thinking, closed = dist.all_gather(per_completion).cpu().T.tolist()
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
        "completion_len_max": max(lengths), "clipped_ratio": sum(truncated) / len(truncated),
        "frac_reward_zero_std": (~has_signal(rewards, cfg.num_generations)).float().mean().item(),
        "extra_rollouts": stats.extra_rollouts, "prompts_sampled": int(prompts_sampled),
        "masked_rows": int(masked_rows),
        "peak_memory_gb": peak, "peak_memory_reserved_gb": reserved, "skipped_updates": stats.skipped,
        "world_size": dist.world_size, **think_fields,
    }
