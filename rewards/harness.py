"""lm-evaluation-harness's GSM8K scoring, to the letter, for comparing with published figures.

The harness's `gsm8k` task (generate_until) reads an answer two ways and compares strings, not numbers:
- strict-match: the FIRST match of `#### (\\-?[0-9\\.\\,]+)` (a space after the marker, no `$`);
- flexible-extract: the LAST match of `(-?[$0-9.,]{2,})|(-?[0-9]+)`;
- exact_match: both the answer and the gold lose `,`, `$`, everything up to `#### ` and a final `.`, are
  lowercased, and must then be the same string (`72.0` is not `72`, `0.5` is not `.5`).
Our own scoring (rewards/numeric.py) takes the last `####`, allows `$`, no space and a fraction, and
compares numbers; docs/eval.md names each difference.
"""

from __future__ import annotations

import re
from typing import Any

from rewards.numeric import completion_text

SCORINGS = ("numeric", "harness")  # eval's --scoring: ours, or the harness's gsm8k rules to the letter
STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")  # regexes_to_ignore, applied in this order


def _select(regex: re.Pattern, text: Any, index: int) -> str | None:
    """The harness's RegexFilter: the match at `index` (0 first, -1 last), its first non-empty group,
    stripped; None where the harness writes "[invalid]"."""
    matches = regex.findall(completion_text(text))
    if not matches:
        return None
    match = matches[index]
    if isinstance(match, tuple):
        match = next((m for m in match if m), None)
        if match is None:
            return None
    return match.strip()


def strict(text: Any) -> str | None:
    """strict-match: the first `#### N` (a space after the marker; digits, `.`, `,` and a leading `-`)."""
    return _select(STRICT_RE, text, 0)


def flexible(text: Any) -> str | None:
    """flexible-extract: the last number-like run in the text."""
    return _select(FLEXIBLE_RE, text, -1)


def normalize(text: str) -> str:
    for pattern in IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def exact_match(predicted: str | None, gold: Any) -> bool:
    """The harness's exact_match of an extracted answer and a gold answer (or a gold solution)."""
    return predicted is not None and normalize(predicted) == normalize(str(gold))
