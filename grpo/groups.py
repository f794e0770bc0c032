"""Steps 1 and 2 of the box: a group of G completions per prompt and their rewards (`Groups`), with
DAPO's dynamic sampling (further prompts until the groups carry a signal) and what is measured of the
completions themselves (thinking spans)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from common.distributed import Dist
from common.errors import fail
from common.timing import Timer
from data.prompt import build_messages, encode_prompt, think_close_id, thinking_span
from grpo.config import GRPOConfig
from grpo.policy import Policy
from rewards.functions import TrainerState, score
from sampling import Completions


def generate_completions(policy: Policy, cfg: GRPOConfig, prompts: list[list[int]], answers: list[str],
                         step: int, rollout_hook: Any) -> tuple[list[list[int]], list[bool], list[list[float]] | None]:
    """G completions per prompt from the policy (or `rollout_hook`'s fixed ones), whether each was cut,
    and the log-prob the sampler drew each token with (None for a hook's token ids; a hook may return
    `Completions` with log-probs instead, standing in for the engine's)."""
    fixed = rollout_hook(step, prompts, answers) if rollout_hook else None
    if fixed is not None:
        rows, logprobs = (fixed.token_ids, fixed.logprobs) if isinstance(fixed, Completions) else (fixed, None)
        return rows, [policy.tokenizer.eos_token_id not in c for c in rows], logprobs
    with policy.autocast():
        out = policy.sampler.sample(prompts, cfg.sampling_params())
    return out.token_ids, out.truncated, out.logprobs


def score_groups(policy: Policy, cfg: GRPOConfig, records: list[dict[str, Any]], prompts: list[list[int]],
                 completions: list[list[int]], texts: list[str], truncated: list[bool],
                 state: TrainerState) -> torch.Tensor:
    """[rows, reward functions] of this rank's completions, NaN where a reward returned None. Each
    function is called as TRL calls rewards (rewards/functions.py): prompts, completions, completion_ids,
    every column of the records, `truncated` and `trainer_state`."""
    G, tok = cfg.num_generations, policy.tokenizer
    rows = [r for r in records for _ in range(G)]
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
        fail(f"no reward scored completion {i} of question {rows[i]['question'][:60]!r}: every reward returned "
             f"None for it; give a reward that applies to every row (or a default value)")
    return table


@dataclass
class Groups:
    """This rank's sampled groups: per prompt its record, tokens and which rollout of the step it came
    from (0; 1, 2... for --dynamic_sampling's further ones); per completion its tokens, whether it was
    cut, its text and its reward functions' scores."""

    records: list[dict[str, Any]]
    prompts: list[list[int]]
    completions: list[list[int]]
    truncated: list[bool]
    scores: torch.Tensor  # [rows, reward functions]
    rollout: list[int]
    texts: list[str]  # the completions decoded (special tokens left out), as the rewards read them
    sampler_logprobs: list[list[float]] | None = None  # per completion token, as drawn; None: not sampled here

    def take(self, groups: list[int], G: int) -> Groups:
        rows = [g * G + k for g in groups for k in range(G)]
        return Groups([self.records[g] for g in groups], [self.prompts[g] for g in groups],
                      [self.completions[r] for r in rows], [self.truncated[r] for r in rows],
                      self.scores[rows], [self.rollout[g] for g in groups], [self.texts[r] for r in rows],
                      None if self.sampler_logprobs is None else [self.sampler_logprobs[r] for r in rows])

    def __add__(self, other: Groups) -> Groups:
        both = self.sampler_logprobs is not None and other.sampler_logprobs is not None
        return Groups(self.records + other.records, self.prompts + other.prompts,
                      self.completions + other.completions, self.truncated + other.truncated,
                      torch.cat([self.scores, other.scores]), self.rollout + other.rollout, self.texts + other.texts,
                      self.sampler_logprobs + other.sampler_logprobs if both else None)


def sample_groups(policy: Policy, cfg: GRPOConfig, records: list[dict[str, Any]], state: TrainerState,
                  rollout_hook: Any, timer: Timer, rollout: int = 0) -> Groups:
    """1 and 2 of the box for `records`: G completions per prompt, and their rewards."""
    prompts = [encode_prompt(policy.tokenizer, r["question"], fmt=policy.prompt) for r in records]
    with timer("generation"):
        completions, truncated, logprobs = generate_completions(policy, cfg, prompts, [r["answer"] for r in records],
                                                                state.global_step, rollout_hook)
    with timer("reward"):
        texts = policy.tokenizer.batch_decode(completions, skip_special_tokens=True)
        scores = score_groups(policy, cfg, records, prompts, completions, texts, truncated, state)
    return Groups(list(records), prompts, completions, truncated, scores, [rollout] * len(records), texts, logprobs)


def has_signal(rewards: torch.Tensor, G: int) -> torch.Tensor:
    """Per group of G rows: whether its rewards differ (an all-equal group has advantage 0: no signal)."""
    return rewards.view(-1, G).std(dim=1) > 0


def with_signal_first(rewards: torch.Tensor, G: int, n: int) -> list[int]:
    """`n` group indices: the groups whose rewards differ (they carry a signal) in order, then, only if
    there are fewer than `n` of those, all-equal groups in order."""
    varied = has_signal(rewards, G).tolist()
    order = [g for g, v in enumerate(varied) if v] + [g for g, v in enumerate(varied) if not v]
    return order[:n]


def dynamic_groups(policy: Policy, cfg: GRPOConfig, dist: Dist, records: list[dict[str, Any]], state: TrainerState,
                   rollout_hook: Any, draw_more: Any, timer: Timer) -> tuple[Groups, int, int]:
    """DAPO's dynamic sampling: sample further prompts (draw_more(attempt) gives this rank's next
    ones) until every rank holds as many groups with a signal as it has prompts, at most
    --max_extra_rollouts times; keep those groups first, all-equal ones only to fill what is missing.
    Returns (the groups, the extra rollouts, the prompts sampled on this rank)."""
    groups = sample_groups(policy, cfg, records, state, rollout_hook, timer)
    extra, G, share = 0, cfg.num_generations, len(records)
    if not cfg.dynamic_sampling:
        return groups, 0, share
    while extra < cfg.max_extra_rollouts:
        signal = int(has_signal(policy.reward_sum(groups.scores), G).sum())
        if dist.all_reduce(torch.tensor(float(min(signal, share)), device=policy.device), "min").item() >= share:
            break  # every rank has enough: ranks leave the loop together, their collectives stay in step
        extra += 1
        groups = groups + sample_groups(policy, cfg, draw_more(extra), state, rollout_hook, timer, rollout=extra)
    sampled = len(groups.records)
    return groups.take(with_signal_first(policy.reward_sum(groups.scores), G, share), G), extra, sampled


def thinking_spans(policy: Policy, completions: list[list[int]]) -> list[tuple[int, bool]] | None:
    """Each completion's (thinking tokens, whether its think block closed), when thinking is on."""
    close_id = think_close_id(policy.tokenizer) if policy.prompt.thinking else None
    return None if close_id is None else [thinking_span(c, close_id) for c in completions]


def completion_rows(policy: Policy, groups: Groups, step: int, rewards: torch.Tensor, advantages: torch.Tensor,
                    trained: list[bool], n_groups: int | None) -> list[dict[str, Any]]:
    """completions.jsonl's lines for this rank's first `n_groups` groups (None: all): each completion
    with its question, gold answer, tokens, every reward and their weighted sum (`rewards`, this rank's
    rows), its advantage, whether it went through the backward, and which rollout it came from."""
    G = len(groups.completions) // max(len(groups.records), 1)
    n = len(groups.completions) if n_groups is None else min(len(groups.completions), n_groups * G)
    names = [name for name, _, _ in policy.rewards]
    rows = []
    for i in range(n):
        record = groups.records[i // G]
        rows.append({"step": step, "question": record["question"], "answer": record["answer"],
                     "completion": groups.texts[i], "tokens": len(groups.completions[i]),
                     "truncated": groups.truncated[i],
                     **{f"reward_{name}": _number(groups.scores[i, j]) for j, name in enumerate(names)},
                     "reward": float(rewards[i]), "advantage": float(advantages[i]), "trained": trained[i],
                     "rollout": groups.rollout[i // G]})
    return rows


def _number(x: torch.Tensor) -> float | None:
    return None if x.isnan() else float(x)
