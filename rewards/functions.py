"""Reward functions for GRPO: the built-ins and your own, with TRL's signature.

    def my_reward(completions: list[str], answer: list[str], **columns) -> list[float]: ...

`completions` are the decoded completions; `answer` the records' final answers (one per completion,
repeated over a group); `columns` the records' other columns as lists of the same length, plus
`truncated` (True where the completion hit the length limit). `--reward module:function` imports one
(the module from the working directory or the Python path); `--reward` may be given several times,
with `--reward_weights` (one per reward, in order; default 1 each): the advantage uses the weighted
sum. A reward that raises, returns the wrong length or a non-finite value stops the run in one line.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common.errors import fail
from rewards.numeric import extract_answer, numeric_reward

RewardFn = Callable[..., Sequence[float]]


def numeric(completions: list[str], answer: list[str], **columns: Any) -> list[float]:
    """1.0 when the number after the last `####` equals the answer (rewards/numeric.py), else 0.0."""
    return numeric_reward(completions, answer)


def format_reward(completions: list[str], answer: list[str], truncated: list[bool] | None = None,
                  **columns: Any) -> list[float]:
    """1.0 for a `#### N` answer in a finished turn (not cut at the length limit), whatever N is."""
    cut = truncated or [False] * len(completions)
    return [float(extract_answer(c) is not None and not t) for c, t in zip(completions, cut)]


BUILTIN: dict[str, RewardFn] = {"numeric": numeric, "format": format_reward}


def resolve(spec: str) -> tuple[str, RewardFn]:
    """(name, function) for a built-in name or `module:function`."""
    if spec in BUILTIN:
        return spec, BUILTIN[spec]
    if ":" not in spec:
        fail(f"--reward {spec!r}: not a built-in ({', '.join(BUILTIN)}) and not module:function")
    module_name, fn_name = spec.split(":", 1)
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - a missing module or one that fails to import: the same fix
        fail(f"--reward {spec}: cannot import {module_name} ({type(exc).__name__}: {exc})")
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        fail(f"--reward {spec}: {module_name} has no function {fn_name!r}")
    return fn_name, fn


def named(funcs: Sequence[RewardFn | str]) -> list[tuple[str, RewardFn]]:
    """Each reward with a unique name for the log (`reward_<name>_mean`): specs resolved, functions by
    their __name__, repeats numbered."""
    out: list[tuple[str, RewardFn]] = []
    for f in funcs:
        name, fn = resolve(f) if isinstance(f, str) else (getattr(f, "__name__", "reward"), f)
        taken = {n for n, _ in out}
        base, k = name, 2
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        out.append((name, fn))
    return out


def score(funcs: list[tuple[str, RewardFn]], completions: list[str], answer: list[str],
          columns: dict[str, list[Any]]) -> dict[str, list[float]]:
    """Each reward's values for the completions, checked: one finite number per completion."""
    scores = {}
    for name, fn in funcs:
        try:
            values = fn(completions, answer, **columns)
        except Exception as exc:  # noqa: BLE001 - the user's code: one line naming it
            fail(f"reward {name} raised {type(exc).__name__}: {exc}")
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            fail(f"reward {name} must return a list of numbers, one per completion (got {type(values).__name__})")
        if len(values) != len(completions):
            fail(f"reward {name} returned {len(values)} values for {len(completions)} completions")
        bad = next((v for v in values if not math.isfinite(v)), None)
        if bad is not None:
            fail(f"reward {name} returned a non-finite value ({bad})")
        scores[name] = values
    return scores
