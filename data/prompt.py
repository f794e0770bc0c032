"""The one prompt format shared by SFT, GRPO, eval and the benchmarks.

A prompt is the model's chat template in Qwen3's non-thinking mode (`enable_thinking=False`), which
ends with `<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n`. The SFT target is the solution (calculator
annotations removed by default) followed by the end-of-turn token, so prompt + target is exactly the
finished assistant turn the template would render, and SFT trains on what GRPO and eval sample from.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

MAX_PROMPT_LENGTH = 512  # tokens; GSM8K's longest prompt is ~250 with Qwen3's tokenizer
INSTRUCTION = "Solve the problem step by step. End with the final answer on its own line as '#### <number>'."
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def build_messages(question: str, shots: Sequence[tuple[str, str]] = ()) -> list[dict[str, str]]:
    """The chat: each few-shot (question, worked solution) as an earlier user/assistant exchange, then
    the question. Every user turn carries the same instruction."""
    messages = []
    for q, solution in shots:
        messages += [{"role": "user", "content": f"{q.strip()}\n{INSTRUCTION}"},
                     {"role": "assistant", "content": solution.strip()}]
    return messages + [{"role": "user", "content": f"{question.strip()}\n{INSTRUCTION}"}]


def render_prompt(tokenizer: Any, question: str, shots: Sequence[tuple[str, str]] = ()) -> str:
    """Chat-template text of the generation prompt for `question` (non-thinking mode)."""
    return tokenizer.apply_chat_template(
        build_messages(question, shots), tokenize=False, add_generation_prompt=True, enable_thinking=False
    )


def clean_solution(solution: str, strip_calculator: bool = True) -> str:
    """GSM8K solution text as an SFT target: `<<48/2=24>>` annotations removed unless asked to keep."""
    solution = solution.strip()
    return _CALCULATOR.sub("", solution) if strip_calculator else solution


def encode_prompt(tokenizer: Any, question: str, shots: Sequence[tuple[str, str]] = ()) -> list[int]:
    return tokenizer(render_prompt(tokenizer, question, shots), add_special_tokens=False)["input_ids"]


def prompts_within(tokenizer: Any, records: list[Any], max_length: int,
                   shots: Sequence[tuple[str, str]] = ()) -> tuple[list[Any], list[list[int]], int]:
    """(records whose prompt fits in `max_length` tokens, their encoded prompts, how many were left out).

    The one policy for over-long prompts (GRPO and eval): skip and count them. Cutting a question's
    start would pose another problem, and a 40,000-token prompt fed whole is an out-of-memory crash.
    The limit is on the problem's own prompt; few-shot turns (`shots`) come on top of it."""
    kept, prompts = [], []
    for r in records:
        ids = encode_prompt(tokenizer, r["question"])
        if len(ids) <= max_length:
            kept.append(r)
            prompts.append(encode_prompt(tokenizer, r["question"], shots) if shots else ids)
    return kept, prompts, len(records) - len(kept)


def encode_sft_example(
    tokenizer: Any,
    question: str,
    solution: str,
    max_length: int | None = None,
    strip_calculator: bool = True,
) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) for one SFT example: labels are -100 on the prompt, the target elsewhere;
    None when prompt + target is longer than `max_length` (never cut mid-answer: the caller counts it).

    The mask is built from the prompt's length, never from the pad id: with pad == eos the end-of-turn
    token would otherwise vanish from the target and the model would never learn to stop.
    """
    prompt_ids = encode_prompt(tokenizer, question)
    target_text = clean_solution(solution, strip_calculator) + tokenizer.eos_token
    target_ids = tokenizer(target_text, add_special_tokens=False)["input_ids"]
    input_ids = prompt_ids + target_ids
    labels = [-100] * len(prompt_ids) + target_ids
    if max_length is not None and len(input_ids) > max_length:
        return None
    return input_ids, labels
