"""Continuous batching (sampling/continuous.py): the same completions as the static batches."""

import torch

from data import make_synthetic
from data.prompt import encode_prompt
from grpo.batch import completion_logits, pack
from models.logprobs import token_logprobs
from sampling import SamplingParams
from sampling.continuous import sample_continuous
from sampling.engine import sample_batch


def _prompts(tokenizer, n=8):
    return [encode_prompt(tokenizer, r["question"]) for r in make_synthetic("test", max_samples=n)]


def _frequent_token(model, tokenizer, prompts) -> int:
    first = sample_batch(model, prompts, SamplingParams(max_new_tokens=12), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return torch.tensor([t for row in first.token_ids for t in row]).mode().values.item()


def test_greedy_completions_equal_the_static_batches(tiny_model, tiny_tokenizer):
    """Rows stop at different steps (a frequent token as eos), so rows are refilled mid-run; every
    completion equals the static path's, in prompt order."""
    prompts = _prompts(tiny_tokenizer, 10)
    args = dict(eos_token_id=_frequent_token(tiny_model, tiny_tokenizer, prompts),
                pad_token_id=tiny_tokenizer.pad_token_id)
    params = SamplingParams(max_new_tokens=30)
    static = sample_batch(tiny_model, prompts, params, **args)
    assert len({len(t) for t in static.token_ids}) > 1
    for rows, sync_every in ((3, 1), (4, 5)):
        got = sample_continuous(tiny_model, prompts, params, **args, rows=rows, sync_every=sync_every)
        assert got.token_ids == static.token_ids and got.truncated == static.truncated
        assert got.prompt_index == list(range(10))


def test_sampled_logprobs_equal_a_forward_pass(tiny_model, tiny_tokenizer):
    prompts = _prompts(tiny_tokenizer, 5)
    out = sample_continuous(tiny_model, prompts, SamplingParams(num_samples=3, max_new_tokens=20, temperature=0.8),
                            eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id,
                            rows=4, generator=torch.Generator().manual_seed(0))
    assert out.prompt_index == [i // 3 for i in range(15)]
    batch = pack([prompts[i] for i in out.prompt_index], out.token_ids, tiny_tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        want = token_logprobs(completion_logits(tiny_model, batch, share_prompts=False), batch.completion_ids, 0.8)
    for row, logps in enumerate(out.logprobs):
        assert torch.allclose(torch.tensor(logps), want[row, : len(logps)], atol=1e-4), row
    assert len({tuple(t) for t in out.token_ids[:3]}) > 1


def test_a_stop_schedule_forces_each_length(tiny_model, tiny_tokenizer):
    prompts = _prompts(tiny_tokenizer, 6)
    lengths = [3, 17, 5, 30, 1, 9]
    for run in (sample_batch, sample_continuous):
        extra = {"rows": 2} if run is sample_continuous else {}
        out = run(tiny_model, prompts, SamplingParams(max_new_tokens=20, temperature=1.0),
                  eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id, stop_at=lengths,
                  **extra)
        assert [len(t) for t in out.token_ids] == [min(n, 20) for n in lengths], run.__name__


def test_ignore_eos_runs_every_row_to_the_limit_on_both_paths(tiny_model, tiny_tokenizer):
    """`ignore_eos` in the params reaches continuous batching as it reaches the static batches: every
    completion has max_new_tokens tokens, counted as truncated, even with a frequent token as eos."""
    prompts = _prompts(tiny_tokenizer, 5)
    eos = _frequent_token(tiny_model, tiny_tokenizer, prompts)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)  # greedy: the frequent token does come
    for run in (sample_batch, sample_continuous):
        extra = {"rows": 3} if run is sample_continuous else {}
        out = run(tiny_model, prompts, params, eos_token_id=eos, pad_token_id=tiny_tokenizer.pad_token_id, **extra)
        assert [len(t) for t in out.token_ids] == [12] * 5 and all(out.truncated), run.__name__
        assert any(eos in t for t in out.token_ids), run.__name__  # eos drawn, and the row went on
