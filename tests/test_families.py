"""The lean decode step on the other families users pick (Qwen2/Qwen2.5, Llama/SmolLM2, Llama-3 rope
scaling, untied heads): greedy equals `generate`, sampled log-probs equal a forward pass, LoRA merged."""

import pytest
import torch

from data import make_synthetic
from data.prompt import encode_prompt
from grpo.batch import completion_logits, pack
from models.logprobs import token_logprobs
from models.tiny import _init_model, family_config
from sampling import Sampler, SamplingParams
from sampling.fast_decode import supports
from tests.conftest import give_lora_b_weights

SMALL = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=1024, rms_norm_eps=1e-6)
FAMILIES = {
    "qwen2": ("qwen2", dict(tie_word_embeddings=True, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})),
    "llama": ("llama", dict(tie_word_embeddings=True, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})),
    # Llama-3.2's rope scaling (scaled down so it bends the frequencies these short prompts use), untied head,
    # its own head_dim
    "llama3-untied": ("llama", dict(tie_word_embeddings=False, head_dim=24, rope_parameters={
        "rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
}


@pytest.fixture(params=list(FAMILIES))
def family_model(request, tiny_tokenizer):
    family, extra = FAMILIES[request.param]
    model = _init_model(family_config(family, tiny_tokenizer, vocab_size=len(tiny_tokenizer), **SMALL, **extra), 0)
    with torch.no_grad():  # sharper than the random init, so positions (rope) and biases move the output
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model.eval()


@pytest.fixture()
def prompts(tiny_tokenizer):
    return [encode_prompt(tiny_tokenizer, r["question"]) for r in make_synthetic("test", max_samples=6)]


def sample(model, tokenizer, prompts, *, fast=None, reference=False, **params):
    """`prompts` through a fresh `Sampler` of `model`, the `SamplingParams` fields by keyword."""
    sampler = Sampler(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, fast=fast,
                      reference=reference)
    return sampler.sample(prompts, SamplingParams(**params))


def test_each_family_takes_the_lean_step_and_its_quirks_are_there(family_model):
    assert supports(family_model)
    attn = family_model.model.layers[0].self_attn
    qwen2 = type(family_model).__name__ == "Qwen2ForCausalLM"
    assert (attn.q_proj.bias is not None) == qwen2 and not hasattr(attn, "q_norm")


def test_greedy_equals_generate(family_model, tiny_tokenizer, prompts):
    want = sample(family_model, tiny_tokenizer, prompts, max_new_tokens=20, reference=True)
    got = sample(family_model, tiny_tokenizer, prompts, max_new_tokens=20)
    assert got.token_ids == want.token_ids and got.truncated == want.truncated
    assert sample(family_model, tiny_tokenizer, prompts, max_new_tokens=20, fast=False).token_ids == want.token_ids


def test_sampled_logprobs_match_a_forward_pass(family_model, tiny_tokenizer, prompts):
    torch.manual_seed(0)
    out = sample(family_model, tiny_tokenizer, prompts[:3], max_new_tokens=16, num_samples=4, temperature=0.8)
    batch = pack([prompts[i] for i in out.prompt_index], out.token_ids, tiny_tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        want = token_logprobs(completion_logits(family_model, batch), batch.completion_ids, temperature=0.8)
    for row, logps in enumerate(out.logprobs):
        assert torch.allclose(torch.tensor(logps), want[row, : len(logps)], atol=1e-4)


def test_lora_is_merged_into_the_lean_step(family_model, tiny_tokenizer, prompts):
    from models.lora import add_lora

    bare = sample(family_model, tiny_tokenizer, prompts[:4], max_new_tokens=12).token_ids
    peft_model = add_lora(family_model, r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    give_lora_b_weights(peft_model, 0.3)
    assert supports(peft_model)
    out = sample(peft_model, tiny_tokenizer, prompts[:4], max_new_tokens=12).token_ids
    assert out == sample(peft_model, tiny_tokenizer, prompts[:4], max_new_tokens=12, reference=True).token_ids
    assert out != bare


def test_every_family_in_the_table_is_tested_here(tiny_tokenizer):
    """A family added to sampling.fast_decode.FAMILIES needs its case above (the tiny Qwen3 is the
    rest of the suite's model), and `supports` holds a model to its table entry: a Qwen3 whose layers
    lost their q/k norms is not the layer the step would run, so it takes the transformers forward."""
    from sampling.fast_decode import FAMILIES as TABLE

    models = {f: _init_model(family_config(f, tiny_tokenizer, vocab_size=len(tiny_tokenizer), **SMALL, **extra), 0)
              for f, extra in FAMILIES.values()}
    assert set(TABLE) == {type(m).__name__ for m in models.values()} | {"Qwen3ForCausalLM"}
    qwen3 = _init_model(family_config("qwen3", tiny_tokenizer, vocab_size=len(tiny_tokenizer), **SMALL), 0)
    assert supports(qwen3)
    del qwen3.model.layers[0].self_attn.q_norm
    assert not supports(qwen3)
