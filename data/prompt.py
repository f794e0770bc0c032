"""The one prompt format shared by SFT, GRPO, eval and the benchmarks, and how answers are read back.

A prompt is the model's chat template applied to [system prompt,] few-shot turns and the question, by
default in Qwen3's non-thinking mode (`enable_thinking=False`), which ends with
`<|im_start|>assistant\n<think>\n\n</think>\n\n`. The SFT target is the solution (calculator annotations
removed by default) followed by the end-of-turn token, so prompt + target is exactly the finished
assistant turn the template would render, and SFT trains on what GRPO and eval sample from.

`PromptFormat` holds what a user may change (`--system_prompt`, `--instruction`, `--chat_template_kwargs`,
`--enable_thinking`). SFT and GRPO save it beside the model they write (`prompt_format.json`); the next
stage uses the saved one unless told otherwise, and a flag that differs from it is said once.

With thinking on (`enable_thinking: true`) the prompt ends at `<|im_start|>assistant\n`, the model thinks
in `<think> ... </think>` and answers after it: an answer is read only after the last `</think>`, and a
completion whose thinking never closes has no answer (`answer_text`). An SFT target is then the worked
solution as the thinking and its `#### N` line as the answer.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from common.errors import fail
from rewards.numeric import THINK_CLOSE, THINK_OPEN, after_thinking

MAX_PROMPT_LENGTH = 512  # tokens; GSM8K's longest prompt is ~250 with Qwen3's tokenizer
INSTRUCTION = "Solve the problem step by step. End with the final answer on its own line as '#### <number>'."
PROMPT_FILE = "prompt_format.json"  # beside a saved model: the format it was trained with
_CALCULATOR = re.compile(r"<<[^<>]*>>")


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes a chat: an optional system prompt, the user turn (`instruction` with a
    `{question}` placeholder, or without one the question then the instruction on the next line) and the
    chat template's keyword arguments (non-thinking by default)."""

    system_prompt: str | None = None
    instruction: str = INSTRUCTION
    chat_template_kwargs: dict[str, Any] = field(default_factory=lambda: {"enable_thinking": False})

    @property
    def thinking(self) -> bool:
        return bool(self.chat_template_kwargs.get("enable_thinking", False))

    def user_turn(self, question: str) -> str:
        if "{question}" in self.instruction:
            return self.instruction.replace("{question}", question.strip())
        return f"{question.strip()}\n{self.instruction}" if self.instruction else question.strip()

    def to_json(self) -> dict[str, Any]:
        return {"system_prompt": self.system_prompt, "instruction": self.instruction,
                "chat_template_kwargs": self.chat_template_kwargs}


DEFAULT_FORMAT = PromptFormat()


def parse_template_kwargs(text: str | None) -> dict[str, Any] | None:
    """--chat_template_kwargs as a dict (None when not given), or a one-line error."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        fail(f"--chat_template_kwargs must be a JSON object such as '{{\"enable_thinking\": true}}' (got {text!r})")
    return value


def saved_format(model: str) -> PromptFormat | None:
    """The format saved beside a model folder by SFT or GRPO, or None (a hub id, `tiny`, an older run)."""
    path = Path(model) / PROMPT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return PromptFormat(data.get("system_prompt"), data.get("instruction", INSTRUCTION),
                            dict(data.get("chat_template_kwargs") or {"enable_thinking": False}))
    except (ValueError, TypeError, AttributeError) as exc:
        fail(f"{path} is not a prompt format ({exc}); remove it, or pass the prompt flags yourself")


def resolve_format(flags: Any, model: str) -> PromptFormat:
    """The format a stage uses: each setting from its flag when given, else from the model's saved format,
    else the default; a given flag that differs from the saved one is said once, naming both values (a
    silent prompt change between SFT and GRPO costs accuracy). `flags` has the DataFlags prompt fields."""
    saved = saved_format(model)
    base = saved or DEFAULT_FORMAT
    kwargs = parse_template_kwargs(flags.chat_template_kwargs)
    if flags.enable_thinking:
        kwargs = {**(kwargs if kwargs is not None else base.chat_template_kwargs), "enable_thinking": True}
    given = {"system_prompt": flags.system_prompt, "instruction": flags.instruction, "chat_template_kwargs": kwargs}
    say = os.environ.get("RANK", "0") == "0"  # once under torchrun too
    for name, value in given.items():
        if say and value is not None and saved is not None and value != getattr(saved, name):
            print(f"warning: --{name} {value!r} differs from the {getattr(saved, name)!r} that {model} was trained "
                  f"with ({Path(model) / PROMPT_FILE}); using {value!r}")
    if flags.instruction is not None:
        check_instruction(flags.instruction)
    return PromptFormat(*(v if v is not None else getattr(base, k) for k, v in given.items()))


def check_instruction(instruction: str) -> None:
    """An instruction may hold `{question}` and no other placeholder."""
    leftover = re.findall(r"\{[^{}]*\}", instruction.replace("{question}", ""))
    if leftover:
        fail(f"--instruction may hold {{question}} and no other placeholder (got {leftover[0]} in {instruction!r})")


def save_format(fmt: PromptFormat, folder: Path) -> None:
    (folder / PROMPT_FILE).write_text(json.dumps(fmt.to_json(), indent=2) + "\n")


def answer_text(completion: str, fmt: PromptFormat = DEFAULT_FORMAT) -> str:
    """The part of a completion that holds its answer: with thinking on, what follows the thinking
    (`rewards.after_thinking`: nothing when it never closes); else the whole completion."""
    return after_thinking(completion) if fmt.thinking else completion


def think_close_id(tokenizer: Any) -> int | None:
    """The id of `</think>` when it is one token of `tokenizer` (Qwen3's and `tiny`'s), else None."""
    close_id = tokenizer.convert_tokens_to_ids(THINK_CLOSE)
    return None if close_id is None or close_id == getattr(tokenizer, "unk_token_id", None) else close_id


def thinking_span(ids: Sequence[int], close_id: int) -> tuple[int, bool]:
    """(tokens of a thinking completion's thinking, whether it closed): the tokens before its last
    `</think>`, or all of them when it never closes (as `answer_text` reads it: no answer then)."""
    if close_id in ids:
        return len(ids) - list(reversed(ids)).index(close_id) - 1, True
    return len(ids), False


def thinking_fields(spans: Sequence[tuple[int, bool]]) -> dict[str, float]:
    """The GRPO log's and the eval summary's thinking figures over (thinking tokens, closed) spans."""
    n = max(1, len(spans))
    return {"thinking_tokens_mean": sum(t for t, _ in spans) / n,
            "thinking_closed_rate": sum(closed for _, closed in spans) / n}


def check_thinking(fmt: PromptFormat, model: str, load_tokenizer: Callable[[str], Any]) -> None:
    """With thinking on, `model`'s chat template must render a thinking mode: a prompt that differs from
    its non-thinking one (Qwen3's leaves the `<think>` block open). A template that ignores
    `enable_thinking` (most non-Qwen chat models) renders the same prompt either way; the model then never
    writes `</think>`, every answer is read as missing and every reward is 0, so this stops in one line.
    Checked before any data or model loads; the tokenizer is loaded (`load_tokenizer(model)`) only when
    thinking is on."""
    if not fmt.thinking:
        return
    tokenizer = load_tokenizer(model)
    off = replace(fmt, chat_template_kwargs={**fmt.chat_template_kwargs, "enable_thinking": False})
    if render_prompt(tokenizer, "1 + 1?", fmt=fmt) == render_prompt(tokenizer, "1 + 1?", fmt=off):
        fail(f"thinking is on (--enable_thinking) but {model}'s chat template has no thinking mode (it renders "
             f"the same prompt with enable_thinking on and off), so no answer would follow a </think> and every "
             f"reward would be 0; drop --enable_thinking (and enable_thinking from --chat_template_kwargs), or use "
             f"a model whose template thinks (Qwen3)")


def warn_thinking(fmt: PromptFormat, max_new_tokens: int, greedy: bool, stage: str) -> None:
    """Qwen's advice for thinking mode, said once per stage: room to think (>= 1,024 new tokens) and
    sampling (temperature 0.6, top_p 0.95, top_k 20), never greedy decoding, which repeats itself."""
    if not fmt.thinking:
        return
    if max_new_tokens < 1024:
        print(f"warning: {stage}: thinking is on but completions stop at {max_new_tokens} tokens; a thinking model "
              f"needs 1,024 or more to close its <think> block (a completion cut inside it has no answer)")
    if greedy:
        print(f"warning: {stage}: thinking is on and decoding is greedy; Qwen advises against greedy decoding for "
              f"thinking (it repeats itself): sample at temperature 0.6, top_p 0.95, top_k 20")


def build_messages(question: str, shots: Sequence[tuple[str, str]] = (),
                   fmt: PromptFormat = DEFAULT_FORMAT) -> list[dict[str, str]]:
    """The chat: the system prompt if any, each few-shot (question, worked solution) as an earlier
    user/assistant exchange, then the question. Every user turn carries the same instruction."""
    messages = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else []
    for q, solution in shots:
        messages += [{"role": "user", "content": fmt.user_turn(q)},
                     {"role": "assistant", "content": solution.strip()}]
    return messages + [{"role": "user", "content": fmt.user_turn(question)}]


def render_prompt(tokenizer: Any, question: str, shots: Sequence[tuple[str, str]] = (),
                  fmt: PromptFormat = DEFAULT_FORMAT) -> str:
    """Chat-template text of the generation prompt for `question`."""
    return tokenizer.apply_chat_template(build_messages(question, shots, fmt), tokenize=False,
                                         add_generation_prompt=True, **fmt.chat_template_kwargs)


def clean_solution(solution: str, strip_calculator: bool = True) -> str:
    """GSM8K solution text as an SFT target: `<<48/2=24>>` annotations removed unless asked to keep."""
    solution = solution.strip()
    return _CALCULATOR.sub("", solution) if strip_calculator else solution


def sft_target(solution: str, fmt: PromptFormat = DEFAULT_FORMAT) -> str:
    """What the assistant turn says after the prompt: the solution; with thinking on, the solution's
    working as the thinking and its final `#### N` line as the answer."""
    if not fmt.thinking or "####" not in solution:
        return solution
    work, final = solution.rsplit("####", 1)
    return f"{THINK_OPEN}\n{work.strip()}\n{THINK_CLOSE}\n\n#### {final.strip()}"


def encode_prompt(tokenizer: Any, question: str, shots: Sequence[tuple[str, str]] = (),
                  fmt: PromptFormat = DEFAULT_FORMAT) -> list[int]:
    return tokenizer(render_prompt(tokenizer, question, shots, fmt), add_special_tokens=False)["input_ids"]


def prompts_within(tokenizer: Any, records: list[Any], max_length: int, shots: Sequence[tuple[str, str]] = (),
                   fmt: PromptFormat = DEFAULT_FORMAT) -> tuple[list[Any], list[list[int]], int]:
    """(records whose prompt fits in `max_length` tokens, their encoded prompts, how many were left out).

    The one policy for over-long prompts (GRPO and eval): skip and count them. Cutting a question's
    start would pose another problem, and a 40,000-token prompt fed whole is an out-of-memory crash.
    The limit is on the problem's own prompt; few-shot turns (`shots`) come on top of it."""
    kept, prompts = [], []
    for r in records:
        ids = encode_prompt(tokenizer, r["question"], fmt=fmt)
        if len(ids) <= max_length:
            kept.append(r)
            prompts.append(encode_prompt(tokenizer, r["question"], shots, fmt) if shots else ids)
    return kept, prompts, len(records) - len(kept)


def encode_sft_example(
    tokenizer: Any,
    question: str,
    solution: str,
    max_length: int | None = None,
    strip_calculator: bool = True,
    fmt: PromptFormat = DEFAULT_FORMAT,
) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) for one SFT example: labels are -100 on the prompt, the target elsewhere;
    None when prompt + target is longer than `max_length` (never cut mid-answer: the caller counts it).

    The mask is built from the prompt's length, never from the pad id: with pad == eos the end-of-turn
    token would otherwise vanish from the target and the model would never learn to stop.
    """
    prompt_ids = encode_prompt(tokenizer, question, fmt=fmt)
    target_text = sft_target(clean_solution(solution, strip_calculator), fmt) + tokenizer.eos_token
    target_ids = tokenizer(target_text, add_special_tokens=False)["input_ids"]
    input_ids = prompt_ids + target_ids
    labels = [-100] * len(prompt_ids) + target_ids
    if max_length is not None and len(input_ids) > max_length:
        return None
    return input_ids, labels
