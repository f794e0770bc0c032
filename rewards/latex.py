"""LaTeX answers (`\\boxed{\\frac{3}{4}}`, `$\\sqrt{2}$`) checked by the `math-verify` package, as TRL's
`accuracy_reward` and verl check them: the built-in `--reward math_verify`, and gold answers in LaTeX.

math-verify is optional (`pip install math-verify`); asking for it without the package is one line.
"""

from __future__ import annotations

import threading
from typing import Any

from common.errors import fail
from rewards.numeric import completion_text

INSTALL = "--reward math_verify needs the math-verify package: pip install math-verify"


def _math_verify() -> Any:
    try:
        import math_verify
    except ImportError:
        fail(INSTALL)
    return math_verify


def require() -> None:
    """Stop in one line, before any model loads, when math-verify is not installed."""
    _math_verify()


def last_boxed(text: str) -> str | None:
    """What the last `\\boxed{...}` (or `\\fbox{...}`) of `text` holds, braces balanced; None without one."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip()
    return None


def _timeouts() -> tuple[int | None, int | None]:
    # math-verify times out with signal.alarm, which only the main thread may set (TRL does the same)
    main = threading.current_thread() is threading.main_thread()
    return (10, 5) if main else (None, None)


def parse_gold(gold: str) -> list[Any]:
    """math-verify's reading of a gold answer (`\\frac{3}{4}`, `3/4`, `72`), as LaTeX math; empty when it
    reads nothing."""
    mv = _math_verify()
    # bare, math-verify reads `2\sqrt{2}` as 2 (its plain-expression fallback); in $...$ it is 2*sqrt(2)
    delimited = "$" in gold or gold.lstrip().startswith(("\\(", "\\["))
    return mv.parse(gold if delimited else f"${gold}$", parsing_timeout=_timeouts()[0])


def gold_answer(text: str) -> str | None:
    """A gold cell's final answer in LaTeX: the last `\\boxed{}`'s content, or the whole cell; None when
    math-verify reads no answer in it."""
    final = last_boxed(text) or text.strip()
    return final if final and parse_gold(final) else None


def math_verify_reward(completions: list[Any], answer: list[str], **columns: Any) -> list[float | None]:
    """1.0 when math-verify finds the completion's answer (a `\\boxed{}` first, then other LaTeX, as TRL's
    accuracy_reward reads it) equal to the gold answer, else 0.0; None for a gold it cannot read."""
    mv = _math_verify()
    from latex2sympy2_extended import NormalizationConfig

    parse_timeout, verify_timeout = _timeouts()
    config = [mv.LatexExtractionConfig(normalization_config=NormalizationConfig(units=True), boxed_match_priority=0,
                                       try_extract_without_anchor=False)]
    out: list[float | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        gold_parsed = parse_gold(str(gold))
        if not gold_parsed:
            out.append(None)
            continue
        parsed = mv.parse(completion_text(completion), extraction_config=config, extraction_mode="first_match",
                          parsing_timeout=parse_timeout)
        out.append(float(mv.verify(gold_parsed, parsed, timeout_seconds=verify_timeout)))
    return out
