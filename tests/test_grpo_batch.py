"""Packing a rollout, and micro-batches cut to the columns they use without changing any log-prob."""

import pytest
import torch

from grpo.batch import completion_logits, completion_logprobs, head_weight, pack
from models.logprobs import token_logprobs, token_logprobs_and_entropy
from tests.conftest import give_lora_b_weights

PAD = 0


def test_pack_layout():
    batch = pack([[1, 2], [3]], [[4, 5, 6], [7]], PAD, "cpu")
    assert batch.input_ids.tolist() == [[1, 2, 4, 5, 6], [0, 3, 7, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 1, 1]]  # padding repeats the last
    assert batch.completion_ids.tolist() == [[4, 5, 6], [7, 0, 0]]
    assert batch.completion_mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_rows_cut_to_the_columns_they_use():
    prompts = [[11, 12, 13, 14, 15], [11, 12, 13, 14, 15], [21, 22], [21, 22]]
    completions = [[1, 2, 3, 4, 5, 6], [1, 2], [7, 8, 9], [7]]
    batch = pack(prompts, completions, PAD, "cpu")
    assert batch.input_ids.shape == (4, 5 + 6)
    mb = batch.take(slice(2, 4))  # short prompts, completions of at most 3 tokens
    assert mb.input_ids.tolist() == [[21, 22, 7, 8, 9], [21, 22, 7, 0, 0]]
    assert mb.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 2, 2]]
    assert mb.completion_ids.tolist() == batch.completion_ids[2:4, :3].tolist()
    assert mb.completion_mask.tolist() == batch.completion_mask[2:4, :3].tolist()
    whole = batch.take(slice(0, 4))  # nothing to cut
    assert torch.equal(whole.input_ids, batch.input_ids) and torch.equal(whole.completion_ids, batch.completion_ids)


def test_cut_micro_batches_give_the_same_logprobs(tiny_model, tiny_tokenizer):
    from data.prompt import encode_prompt

    questions = ("Tom has 14 apples, buys 6 more and eats 5. How many are left?", "What is 2 plus 3?")
    prompts = [encode_prompt(tiny_tokenizer, q) for q in questions]
    assert len(prompts[0]) > len(prompts[1])
    prompts = [prompts[0]] * 2 + [prompts[1]] * 2
    completions = [[30 + i for i in range(n)] for n in (9, 4, 2, 5)]
    batch = pack(prompts, completions, tiny_tokenizer.pad_token_id, "cpu")
    tiny_model.eval()
    with torch.no_grad():
        full = token_logprobs(completion_logits(tiny_model, batch), batch.completion_ids) * batch.completion_mask
        for rows, cut in ((slice(0, 2), 0), (slice(2, 4), 4 + len(prompts[0]) - len(prompts[2])), (slice(1, 3), 5)):
            mb = batch.take(rows)
            assert mb.input_ids.shape[1] == batch.input_ids.shape[1] - cut
            part = token_logprobs(completion_logits(tiny_model, mb), mb.completion_ids) * mb.completion_mask
            assert torch.allclose(part, full[rows, : mb.completion_width], atol=1e-5)
            assert not full[rows, mb.completion_width:].any()


def _mixed_batch(tokenizer):
    """Two groups of 3 with prompts of different lengths and ragged completions, and a lone prompt."""
    from data.prompt import encode_prompt

    questions = ("Tom has 14 apples, buys 6 more and eats 5. How many are left?", "What is 2 plus 3?", "And 7x8?")
    long, short, lone = (encode_prompt(tokenizer, q) for q in questions)
    prompts = [long] * 3 + [short] * 3 + [lone]
    completions = [[30 + (i * 7 + j) % 50 for j in range(n)] for i, n in enumerate((9, 4, 2, 5, 1, 7, 3))]
    return pack(prompts, completions, tokenizer.pad_token_id, "cpu")


def _logprobs_and_grads(model, mb, share, projected=False):
    """Log-probs and gradients through the model's logits, or with `projected` the loss's own projection."""
    model.zero_grad()
    if projected:
        logp = completion_logprobs(model, mb, share_prompts=share)[0] * mb.completion_mask
    else:
        logp = token_logprobs(completion_logits(model, mb, share_prompts=share), mb.completion_ids) * mb.completion_mask
    (logp.sum() + (logp * torch.linspace(0, 1, logp.numel()).view_as(logp)).sum()).backward()
    return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_shared_prompt_forward_matches_the_plain_forward(tiny_model, tiny_tokenizer):
    """Each group's prompt runs once and its cache is repeated for the group: same log-probs and the same
    gradients (through the shared prompt too) as one forward per row, for whole groups, a micro-batch
    that cuts across groups, and rows of different prompts."""
    import grpo.batch as gb

    batch = _mixed_batch(tiny_tokenizer)
    tiny_model.train()
    calls = []
    for rows in (slice(0, 7), slice(1, 5), slice(5, 7)):
        mb = batch.take(rows)
        plain, plain_grads = _logprobs_and_grads(tiny_model, mb, share=False)
        group = gb._prompt_groups(mb)
        calls.append(None if group is None else group.tolist())
        shared, shared_grads = _logprobs_and_grads(tiny_model, mb, share=True)
        assert torch.allclose(shared, plain, atol=1e-5)
        assert plain_grads.keys() == shared_grads.keys() and len(plain_grads) > 0
        for name, g in plain_grads.items():
            assert (shared_grads[name] - g).norm() <= 1e-5 * g.norm(), name
    assert calls == [[0, 0, 0, 1, 1, 1, 2], [0, 0, 1, 1], None]  # the last pair has two different prompts
    tiny_model.zero_grad()


def test_the_loss_projects_the_hidden_states_itself_with_the_logits_paths_values_and_gradients(tiny_model,
                                                                                               tiny_tokenizer):
    """completion_logprobs hands the decoder's hidden states (not [B, C, V] logits) to projected_logprobs:
    the same log-probs, entropy and gradients (the head's and every layer's) as the logits path, with
    prompts shared or not."""
    import grpo.batch as gb

    batch = _mixed_batch(tiny_tokenizer)
    tiny_model.train()
    assert head_weight(tiny_model) is tiny_model.get_output_embeddings().weight
    outputs = []
    real = gb._completion_forward
    gb._completion_forward = lambda *a, **k: outputs.append(real(*a, **k)) or outputs[-1]
    try:
        for share in (False, True):
            want, want_grads = _logprobs_and_grads(tiny_model, batch, share)
            got, got_grads = _logprobs_and_grads(tiny_model, batch, share, projected=True)
            assert outputs[-1].shape[-1] == tiny_model.config.hidden_size  # hidden states, not logits
            assert torch.allclose(got, want, atol=1e-5) and got_grads.keys() == want_grads.keys()
            for name, g in want_grads.items():
                assert (got_grads[name] - g).norm() <= 1e-5 * g.norm(), name
            with torch.no_grad():
                _, entropy = completion_logprobs(tiny_model, batch, 0.7, with_entropy=True, share_prompts=share)
                logits = completion_logits(tiny_model, batch, share)
                _, want_entropy = token_logprobs_and_entropy(logits, batch.completion_ids, 0.7)
            assert torch.allclose(entropy, want_entropy, atol=1e-5)
    finally:
        gb._completion_forward = real
    tiny_model.zero_grad()


def test_shared_prompt_forward_under_lora_and_without_grad(tiny_model, tiny_tokenizer):
    from models.lora import add_lora

    batch = _mixed_batch(tiny_tokenizer)
    peft_model = add_lora(tiny_model, r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    give_lora_b_weights(peft_model, 0.2)
    plain, plain_grads = _logprobs_and_grads(peft_model, batch, share=False)
    assert head_weight(peft_model) is not None  # the head is not adapted: the loss projects with it
    for share, projected in ((True, False), (False, True), (True, True)):
        logp, grads = _logprobs_and_grads(peft_model, batch, share=share, projected=projected)
        assert torch.allclose(logp, plain, atol=1e-5) and all("lora" in n for n in grads)
        for name, g in plain_grads.items():
            assert (grads[name] - g).norm() <= 1e-5 * g.norm(), name
    with torch.no_grad(), peft_model.disable_adapter():  # the reference pass
        ref_plain = completion_logits(peft_model, batch, share_prompts=False)
        ref_shared = completion_logits(peft_model, batch)
        ref_projected = completion_logprobs(peft_model, batch)[0]
    assert torch.allclose(ref_shared, ref_plain, atol=1e-5)
    ref = token_logprobs(ref_plain, batch.completion_ids)
    assert torch.allclose(ref_projected, ref, atol=1e-5) and not torch.allclose(ref, plain, atol=1e-3)


def test_shared_prompt_forward_under_bf16_autocast(tiny_model, tiny_tokenizer):
    """CUDA's compute policy (fp32 weights, bf16 autocast) on the CPU: the cached prompt keys and values
    are bf16 like the completion's, and the shared forward stays as close to the plain one as bf16
    rounding lets it."""
    batch = _mixed_batch(tiny_tokenizer)
    tiny_model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, plain_grads = _logprobs_and_grads(tiny_model, batch, share=False)
        shared, shared_grads = _logprobs_and_grads(tiny_model, batch, share=True)
    assert (shared - plain).abs().max() < 0.02  # seen: 0.0019
    for name, g in plain_grads.items():
        assert (shared_grads[name] - g).norm() <= 0.05 * g.norm(), name  # seen: at most 0.012
    tiny_model.zero_grad()


def test_gradient_checkpointing_takes_the_plain_forward(tiny_model, tiny_tokenizer, monkeypatch):
    """Checkpointed layers drop the KV cache, so such models never take the shared-prompt path."""
    import copy

    import grpo.batch as gb

    model = copy.deepcopy(tiny_model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert gb._checkpointing(model) and not gb._checkpointing(tiny_model)
    monkeypatch.setattr(gb, "_prompt_groups", lambda batch: (_ for _ in ()).throw(AssertionError("shared path")))
    batch = _mixed_batch(tiny_tokenizer)
    with pytest.raises(AssertionError, match="shared path"):
        completion_logits(tiny_model, batch)
    logp, _ = _logprobs_and_grads(model, batch, share=False)
    assert torch.allclose(token_logprobs(completion_logits(model, batch), batch.completion_ids)
                          * batch.completion_mask, logp, atol=1e-5)
