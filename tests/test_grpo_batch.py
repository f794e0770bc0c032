"""Packing a rollout, and micro-batches cut to the columns they use without changing any log-prob."""

import torch

from grpo.batch import completion_logits, pack
from grpo.loss import token_logprobs

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
    mb = batch.rows(slice(2, 4))  # short prompts, completions of at most 3 tokens
    assert mb.input_ids.tolist() == [[21, 22, 7, 8, 9], [21, 22, 7, 0, 0]]
    assert mb.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 2, 2]]
    assert mb.completion_ids.tolist() == batch.completion_ids[2:4, :3].tolist()
    assert mb.completion_mask.tolist() == batch.completion_mask[2:4, :3].tolist()
    whole = batch.rows(slice(0, 4))  # nothing to cut
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
            mb = batch.rows(rows)
            assert mb.input_ids.shape[1] == batch.input_ids.shape[1] - cut
            part = token_logprobs(completion_logits(tiny_model, mb), mb.completion_ids) * mb.completion_mask
            assert torch.allclose(part, full[rows, : mb.completion_width], atol=1e-5)
            assert not full[rows, mb.completion_width:].any()
