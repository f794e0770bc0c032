"""Read the number after the last `####` marker and compare it with the ground truth.

A number is an integer or decimal (`1,080`, `-5`, `18.00`), a fraction (`3/4`: 0.75, exactly) or a mixed
number (`2 1/2`: 2.5); a form that is not one exact number (`1/2/3`, `3/0`, `1.5/2`, `2 3/2`) reads as no
answer, and as gold it is refused (data/).

Every function here is total: whatever the text (None, 100 kB of junk, `nan`, `1e400`, unicode
digits), reading gives a string or None and scoring gives 1.0 or 0.0. Nothing raises on text.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

MARKER = "####"
# What a gold answer may be, in the one-line error that refuses one (data/).
NUMBER_FORMS = "numbers are 1,080, -5, 0.75, 3/4 or 2 1/2 (one exact number: not 1/2/3, 3/0 or 1.5/2)"
# |pred - gold| <= REL_TOLERANCE * max(1, |gold|): exact for integers and short decimals,
# forgiving of float round-off on large values ("18.00" == "18", "0.5" == ".5").
REL_TOLERANCE = 1e-6
# Only this many characters after the marker are read: a number longer than that is not an answer.
_WINDOW = 256

# What may stand between the marker and the number: spaces/newlines, markdown emphasis, `$`, `\(`.
_LEAD = r"[\s*_`$\\(]*"
# ASCII digits only (re.ASCII): unicode digits are not GSM8K answers. Commas only between digits.
_NUMBER = r"[+-]?\s*(?:[0-9](?:[0-9]|,(?=[0-9]))*(?:\.[0-9]+)?|\.[0-9]+)"
# A number may not run on into scientific notation (`1e400`) or another digit.
_END = r"(?![eE][+-]?[0-9])(?![0-9])"
# An exact fraction after the number: a mixed number's `1/2` (in `3 1/2`) or a fraction's `/4` (in `3/4`).
_MIXED = r"(?:[ \t]+([0-9]+)[ \t]*/[ \t]*([0-9]+))"
_OVER = r"(?:[ \t]*/[ \t]*([0-9]+))"
_VALUE = r"(" + _NUMBER + r")(?:" + _MIXED + r"|" + _OVER + r")?" + _END
_ANSWER_RE = re.compile(_LEAD + _VALUE, re.ASCII)
_CONTINUES = set("0123456789.,eE")
_BARE_RE = re.compile(r"\s*\$?\s*" + _VALUE, re.ASCII)
# What may not follow a read value: another `/N` (`1/2/3`, a date) or a decimal part (`3/4.5`).
_RUNS_ON_RE = re.compile(r"[ \t]*/[ \t]*[0-9]|\.[0-9]", re.ASCII)


def _normalize(number: str) -> str:
    """'+ 1,080' -> '1080': drop spaces, commas and a leading plus sign."""
    number = number.replace(" ", "").replace("\t", "").replace("\n", "").replace(",", "")
    return number[1:] if number.startswith("+") else number


def _value_text(match: re.Match, text: str) -> str | None:
    """The normalized value of a `_VALUE` match: '1080', '-3/4', '2 1/2'; None for a form that is not one
    exact number: a fraction of decimals or of a number with commas ('1.5/2'), a zero denominator, a
    mixed number whose fraction is not proper ('2 3/2'), or one that runs on ('1/2/3', '3/4.5')."""
    number, whole_num, whole_den, den = match.group(1, 2, 3, 4)
    if _RUNS_ON_RE.match(text, match.end()):
        return None
    number = _normalize(number)
    if whole_num is None and den is None:
        return number
    if not number.lstrip("-").isdigit() or "," in match.group(1):
        return None  # 1.5/2, 1,080/3: not a fraction of whole numbers
    if den is not None:
        return f"{number}/{int(den)}" if int(den) else None
    if not 0 < int(whole_den) or not int(whole_num) < int(whole_den):
        return None
    return f"{number} {int(whole_num)}/{int(whole_den)}"


def _exact(value: str) -> Fraction:
    """The exact value of a normalized number: '18.5', '-3/4', '-2 1/2' (-2.5)."""
    if " " in value:
        whole, part = value.split(" ")
        sign = -1 if whole.startswith("-") else 1
        return sign * (abs(Fraction(whole)) + Fraction(part))
    return Fraction(value)


# lm-evaluation-harness's gsm8k "flexible-extract": the last match of this pattern (a number-like run of
# two or more of [$0-9.,], or a bare integer), with commas, `$` and a trailing period ignored.
_FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def extract_last_number(completion: Any) -> str | None:
    """The harness's flexible extraction: the last number in the text, normalized ('1,080.' -> '1080'),
    or None. Scored with the same numeric comparison as the strict `####` answer."""
    try:
        matches = _FLEXIBLE_RE.findall(completion_text(completion))
    except Exception:  # noqa: BLE001 - never raises on text
        return None
    if not matches:
        return None
    last = next(m for m in matches[-1] if m).replace(",", "").replace("$", "")
    last = last[:-1] if last.endswith(".") else last
    return last if parse_number(last) is not None else None


def completion_text(completion: Any) -> str:
    """Text of a completion: a string, or chat-style [{role, content}, ...] (last message)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        content = completion.get("content")
        return content if isinstance(content, str) else ""
    if isinstance(completion, (list, tuple)) and completion:
        return completion_text(completion[-1])
    return ""


def extract_answer(text: Any) -> str | None:
    """The number after the LAST `####` in `text`, normalized ('1080', '-5', '18.00'), or None."""
    try:
        text = completion_text(text)
        pos = text.rfind(MARKER)
        if pos < 0:
            return None
        start = pos + len(MARKER)
        match = _ANSWER_RE.match(text, start, start + _WINDOW)
        if not match:
            return None
        if match.end() == start + _WINDOW and text[match.end() : match.end() + 1] in _CONTINUES:
            return None  # the number runs on past the window: too long to be an answer
        return _value_text(match, text[: start + _WINDOW])
    except Exception:  # noqa: BLE001 - a reward must never raise on text
        return None


def parse_number(text: Any) -> float | None:
    """A finite float from a ground-truth string such as '1,080', '$18', '-5', '3/4' (0.75, exactly) or
    '2 1/2' (2.5), else None: also for forms that are not one exact number ('1/2/3', '3/0', '1.5/2')."""
    try:
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            value = float(text)
        else:
            bare = str(text)[:_WINDOW]
            match = _BARE_RE.match(bare)
            number = _value_text(match, bare) if match else None
            if number is None:
                return None
            value = float(_exact(number))
        return value if math.isfinite(value) else None
    except Exception:  # noqa: BLE001
        return None


def answers_match(predicted: str | None, gold: Any) -> bool:
    """True when both parse to finite numbers equal within REL_TOLERANCE * max(1, |gold|)."""
    pred_value, gold_value = parse_number(predicted), parse_number(gold)
    if pred_value is None or gold_value is None:
        return False
    return abs(pred_value - gold_value) <= REL_TOLERANCE * max(1.0, abs(gold_value))


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def after_thinking(completion: Any) -> str:
    """The answer part of a completion from a thinking model: what follows its last `</think>`, and nothing
    when it has none: a completion cut inside its reasoning has no answer, whatever tentative `#### N` it
    wrote there. (A thinking model always closes its think block when it finishes, and templates such as
    Qwen3-Thinking-2507's open it in the prompt, so the completion may hold `</think>` alone.)"""
    text = completion_text(completion)
    end = text.rfind(THINK_CLOSE)
    return text[end + len(THINK_CLOSE):] if end >= 0 else ""


def numeric_reward(completions: list[Any], answers: list[Any]) -> list[float]:
    """1.0 for each completion whose `####` answer equals its ground truth, else 0.0."""
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    return [1.0 if answers_match(extract_answer(c), a) else 0.0 for c, a in zip(completions, answers)]
