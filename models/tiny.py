"""Offline stand-ins: the `tiny` Qwen3 model, and real Qwen3, Qwen2.5 and Llama shapes with random weights.

`tiny` is a random-weight `Qwen3ForCausalLM` (~0.85M parameters) with a small byte-level BPE tokenizer
(digits split one per token, as Qwen's are; `<|im_start|>`/`<|im_end|>` chat template that renders
Qwen3's non-thinking turns). It is built deterministically in-process and cached on disk, so tests and
the offline demo need no network.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from common.errors import fail
from common.run_files import readable_as_umask_says
from data.prompt import INSTRUCTION
from data.synthetic import make_synthetic

TINY_VERSION = "v4"  # in the cached folder's name: a new version when the tokenizer or the weights change
PAD, EOS, IM_START = "<|endoftext|>", "<|im_end|>", "<|im_start|>"
THINK_TOKENS = ("<think>", "</think>")
SPECIAL_TOKENS = [PAD, IM_START, EOS, *THINK_TOKENS]
TINY_VOCAB = 512

# Qwen3's template for what we use: system/user/assistant turns, and in non-thinking mode an empty
# think block both after the generation prompt and before a finished assistant turn's content.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Real Qwen3 shapes (config.json of the hub releases), for `random:<id>` benchmark models.
QWEN3_SHAPES: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                            num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "Qwen/Qwen3-1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                            num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "Qwen/Qwen3-4B": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                          num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    # not a release: the 4-layer, 256-wide Qwen3 (full vocabulary) that CPU step timings are quoted for
    "qwen3-4x256": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
}
QWEN3_COMMON = dict(vocab_size=151936, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
                    rope_parameters={"rope_theta": 1_000_000.0, "rope_type": "default"})


def cache_dir() -> Path:
    root = os.environ.get("QGG_CACHE_DIR") or Path.home() / ".cache" / "qwen_gsm8k_grpo"
    return Path(root)


def _tokenizer_corpus() -> list[str]:
    texts = []
    for r in make_synthetic("train", max_samples=3000, seed=1234):  # as rendered in prompts and targets
        texts += [f"user\n{r['question']}\n{INSTRUCTION}\n", "assistant\n\n\n\n\n", r["solution"]]
    return texts


def build_tiny_tokenizer() -> Any:
    """Train the tiny byte-level BPE deterministically and wrap it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_tokenizer_corpus(), trainer)
    # As in Qwen3's tokenizer, <think> and </think> are added tokens that are not special: decoding with
    # skip_special_tokens keeps them, so a completion's thinking can be told from its answer.
    spec = json.loads(bpe.to_str())
    for added in spec["added_tokens"]:
        added["special"] = added["content"] not in THINK_TOKENS
    bpe = Tokenizer.from_str(json.dumps(spec))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS, pad_token=PAD, bos_token=None, unk_token=None,
        additional_special_tokens=[IM_START], model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_config(tokenizer: Any) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
        tie_word_embeddings=True, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


# Other families users pick first after Qwen3 (config.json of the hub releases): the lean decode step
# takes them too (sampling/fast_decode.py). Qwen2 has q/k/v biases and no q/k norm; Llama neither; the
# Llama-3.2 shape has Llama-3's rope scaling.
OTHER_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "Qwen/Qwen2.5-0.5B-Instruct": ("qwen2", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_theta": 1_000_000.0, "rope_type": "default"})),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llama", dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_theta": 100_000.0, "rope_type": "default"})),
    "meta-llama/Llama-3.2-1B-Instruct": ("llama", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_theta": 500_000.0, "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
}
CONFIG_CLASSES = {"qwen3": "Qwen3Config", "qwen2": "Qwen2Config", "llama": "LlamaConfig"}


def family_config(family: str, tokenizer: Any, **shape: Any) -> Any:
    """A `family` (qwen3, qwen2, llama) config of this shape, special-token ids taken from `tokenizer`."""
    import transformers

    cls = getattr(transformers, CONFIG_CLASSES[family])
    return cls(**shape, bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def random_config(hub_id: str, tokenizer: Any) -> Any:
    """The real architecture of `hub_id` (a Qwen3 shape or one of OTHER_SHAPES) with special-token ids
    taken from `tokenizer`."""
    if hub_id in QWEN3_SHAPES:
        return family_config("qwen3", tokenizer, **{**QWEN3_COMMON, **QWEN3_SHAPES[hub_id]})
    if hub_id in OTHER_SHAPES:
        family, shape = OTHER_SHAPES[hub_id]
        return family_config(family, tokenizer, **shape)
    fail(f"random:{hub_id} is not a known shape; choose one of {', '.join([*QWEN3_SHAPES, *OTHER_SHAPES])}")


def _init_model(config: Any, seed: int) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    # its own RNG stream: building (or not, when cached) never moves the caller's seeded state, so a
    # run's LoRA init and dropout are the same on the first run, which builds `tiny`, and on later ones
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, bos_token_id=None
    )
    return model


def tiny_dir() -> Path:
    """The cached `tiny` model + tokenizer folder, built on first use (atomically, race-safe)."""
    final = cache_dir() / f"tiny-{TINY_VERSION}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=final.parent))
    try:
        tokenizer = build_tiny_tokenizer()
        model = _init_model(tiny_config(tokenizer), seed=0)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        readable_as_umask_says(tmp)  # a shared cache: mkdtemp made it 0700
        try:
            tmp.rename(final)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def random_model(hub_id: str, tokenizer: Any, seed: int = 0) -> Any:
    return _init_model(random_config(hub_id, tokenizer), seed)
