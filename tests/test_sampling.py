"""The rollout engine samples what `model.generate` samples, and its logprobs are the model's."""

import pytest
import torch

from data import make_synthetic
from data.prompt import encode_prompt
from grpo.batch import completion_logits, pack
from grpo.loss import token_logprobs
from sampling import rollout, sample, sample_with_generate
from sampling.engine import _sample_token
from sampling.fast_qwen3 import supports


@pytest.fixture()
def prompts(tiny_tokenizer):
    return [encode_prompt(tiny_tokenizer, r["question"]) for r in make_synthetic("test", max_samples=8)]


def kwargs(tokenizer, **extra):
    return dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)


@pytest.mark.parametrize("fast", [True, False])
def test_greedy_equals_generate(tiny_model, tiny_tokenizer, prompts, fast):
    assert supports(tiny_model)
    want = sample_with_generate(tiny_model, prompts, **kwargs(tiny_tokenizer, max_new_tokens=24))
    got = rollout(tiny_model, prompts, **kwargs(tiny_tokenizer, max_new_tokens=24), fast=fast)
    assert got.token_ids == want.token_ids and got.truncated == want.truncated


@pytest.mark.parametrize("fast", [True, False])
def test_early_stop_and_dropped_rows_match_generate(tiny_model, tiny_tokenizer, prompts, fast):
    """Use a token the random model often emits as 'eos': rows stop at different steps, the engine
    drops finished rows from the batch, and every row still matches generate's."""
    first = sample_with_generate(tiny_model, prompts, **kwargs(tiny_tokenizer, max_new_tokens=12))
    common = torch.tensor([t for row in first.token_ids for t in row]).mode().values.item()
    args = dict(eos_token_id=common, pad_token_id=tiny_tokenizer.pad_token_id, max_new_tokens=30)
    want = sample_with_generate(tiny_model, prompts, **args)
    got = rollout(tiny_model, prompts, **args, fast=fast)
    assert got.token_ids == want.token_ids and got.truncated == want.truncated
    assert len({len(r) for r in got.token_ids}) > 1 and not all(got.truncated)  # rows really did stop apart


@pytest.mark.parametrize("fast", [True, False])
def test_sampled_logprobs_match_a_forward_pass(tiny_model, tiny_tokenizer, prompts, fast):
    torch.manual_seed(0)
    out = rollout(tiny_model, prompts[:3], **kwargs(tiny_tokenizer, max_new_tokens=16, num_samples=4,
                                                     temperature=0.7, top_p=0.9), fast=fast)
    assert out.prompt_index == [i // 4 for i in range(12)]
    batch = pack([prompts[i] for i in out.prompt_index], out.token_ids, tiny_tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        want = token_logprobs(completion_logits(tiny_model, batch), batch.completion_ids, temperature=0.7)
    for row, logps in enumerate(out.logprobs):
        assert torch.allclose(torch.tensor(logps), want[row, : len(logps)], atol=1e-4)
    assert len({tuple(t) for t in out.token_ids[:4]}) > 1  # the samples of a group differ


def test_ignore_eos_forces_the_length(tiny_model, tiny_tokenizer, prompts):
    out = rollout(tiny_model, prompts[:2], **kwargs(tiny_tokenizer, max_new_tokens=9, num_samples=3,
                                                     temperature=1.0), ignore_eos=True)
    assert [len(t) for t in out.token_ids] == [9] * 6 and all(out.truncated)


def test_sampling_follows_softmax_and_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20_000, 1)
    gen = torch.Generator().manual_seed(0)
    token, logp = _sample_token(logits, 0.5, 1.0, gen)
    want = torch.softmax(logits[0] / 0.5, -1)
    freq = torch.bincount(token, minlength=4).float() / len(token)
    assert torch.allclose(freq, want, atol=0.01), (freq, want)
    assert torch.allclose(logp, torch.log(want)[token])
    token, _ = _sample_token(logits, 1.0, 0.8, gen)  # p = .64, .24, .09, .03: top-p 0.8 keeps two
    assert set(token.tolist()) == {0, 1}
    greedy, _ = _sample_token(logits[:2], 0.0, 1.0, None)
    assert greedy.tolist() == [0, 0]


def test_sample_batches_prompts_and_restores_train_mode(tiny_model, tiny_tokenizer, prompts):
    tiny_model.train()
    whole = sample(tiny_model, prompts, **kwargs(tiny_tokenizer, max_new_tokens=8))
    chunked = sample(tiny_model, prompts, **kwargs(tiny_tokenizer, max_new_tokens=8), batch_size=3)
    assert chunked.token_ids == whole.token_ids and chunked.prompt_index == list(range(8))
    assert tiny_model.training


def test_lora_model_takes_the_model_forward(tiny_model, tiny_tokenizer, prompts):
    from models.lora import add_lora

    peft_model = add_lora(tiny_model, r=4, alpha=8, dropout=0.0)
    assert not supports(peft_model)
    out = rollout(peft_model, prompts[:2], **kwargs(tiny_tokenizer, max_new_tokens=6))
    assert out.token_ids == sample_with_generate(peft_model, prompts[:2],
                                                 **kwargs(tiny_tokenizer, max_new_tokens=6)).token_ids
