"""Reward functions for GRPO: the built-ins and your own, called the way TRL calls them.

Every reward is called with keyword arguments only, as TRL's GRPOTrainer does:

    reward(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns) -> list

- `completions`: the decoded completions, or with `--reward_format messages` each as a chat
  `[{"role": "assistant", "content": text}]` (as TRL hands conversational data; `c[0]["content"]`).
- `prompts`: each completion's prompt, the text the model saw (the chat template applied), or with
  `--reward_format messages` its chat messages (system prompt, few-shot turns, the question).
- `completion_ids`: each completion's token ids, without padding.
- `columns`: every column of the records, one entry per completion (repeated over a group): `question`,
  `answer` (the final answer), `solution` (None for answer-only data), every column of the dataset under
  its own name (`--answer_field final`: `final` too, as written), and `truncated` (True where the
  completion hit the length limit).
- `trainer_state`: `.global_step` (updates done), `.max_steps`, `.epoch`.

So TRL-style rewards (`def f(completions, **kwargs)`, `def f(prompts, completions, answer, **kwargs)`)
and this project's own style (`def f(completions, answer, **columns)`) both work. A reward returns one
number per completion, or None for a row it does not apply to (multi-task data): the weighted sum then
skips it and its mean ignores it; a row that no reward scores stops the run in one line. An `async def`
reward is awaited, all of a step's async rewards concurrently (as TRL gathers them), each value in order. A reward that
raises, returns the wrong length, or a NaN or infinite value stops the run in one line naming it.
`--reward module:function` imports one (from the working directory or the Python path); `--reward`
may be given several times, with `--reward_weights` (one per reward, in order; default 1 each).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import fail
from rewards import latex
from rewards.numeric import after_thinking, extract_answer, numeric_reward

RewardFn = Callable[..., Sequence[float]]


def numeric(completions: list[Any], answer: list[str], **columns: Any) -> list[float]:
    """1.0 when the number after the last `####` equals the answer (rewards/numeric.py), else 0.0."""
    return numeric_reward(completions, answer)


def format_reward(completions: list[Any], truncated: list[bool] | None = None, **columns: Any) -> list[float]:
    """1.0 for a `#### N` answer in a finished turn (not cut at the length limit), whatever N is."""
    cut = truncated or [False] * len(completions)
    return [float(extract_answer(c) is not None and not t) for c, t in zip(completions, cut)]


def after_thinking_of(reward: RewardFn) -> RewardFn:
    """`reward` reading only what follows each completion's thinking (`after_thinking`): the built-ins
    with --enable_thinking."""

    def wrapped(completions: list[Any], **kwargs: Any) -> Sequence[float]:
        return reward(completions=[after_thinking(c) for c in completions], **kwargs)

    wrapped.__name__ = reward.__name__
    return wrapped


REWARD_FORMATS = ("text", "messages")  # --reward_format: how prompts and completions reach the rewards
OVERLONG_CACHE = 64  # tokens: DAPO's soft-punishment interval before the limit (their L_cache; --overlong_cache)


def overlong_penalty(length: int, max_length: int, cache: int = OVERLONG_CACHE) -> float:
    """DAPO's soft overlong punishment (Yu et al., 2025, eq. 13) of a completion of `length` tokens under
    a limit of `max_length`: 0 up to max_length - cache, then falling linearly to -1 at max_length
    (-1 beyond it too). A cache of 0 punishes only a completion that reaches the limit (a rollout never
    runs past it, so DAPO's literal "-1 beyond the limit" would punish nothing)."""
    start = max_length - cache
    if length >= max_length:
        return -1.0
    if length <= start:
        return 0.0
    return (start - length) / cache


def soft_overlong_punishment(max_length: int, cache: int = OVERLONG_CACHE) -> RewardFn:
    """The built-in `overlong` reward for completions limited to `max_length` tokens: DAPO's soft
    punishment of each completion's length (`overlong_penalty`). Add it to `numeric` (`--reward numeric
    --reward overlong`) so a completion cut at the limit scores below a wrong one that finished instead of
    alike (DAPO's "reward noise")."""

    def overlong(completion_ids: list[list[int]], **columns: Any) -> list[float]:
        return [overlong_penalty(len(ids), max_length, cache) for ids in completion_ids]

    return overlong


@dataclass(frozen=True)
class RewardSettings:
    """What the built-ins are made from: the run's completion limit, --overlong_cache, and whether the
    model thinks first (then `numeric` and `format` read only the answer after the thinking)."""

    max_length: int = 512
    overlong_cache: int = OVERLONG_CACHE
    thinking: bool = False


def _reads_answers(reward: RewardFn) -> Callable[[RewardSettings], RewardFn]:
    return lambda s: after_thinking_of(reward) if s.thinking else reward


# name -> (how the built-in reward is made from the run's settings, what it rewards: --reward's help).
# Adding a built-in is one entry here; a reward of your own needs none (--reward module:function).
BUILTIN: dict[str, tuple[Callable[[RewardSettings], RewardFn], str]] = {
    "numeric": (_reads_answers(numeric), "the exact answer"),
    "format": (_reads_answers(format_reward), "'#### N' and a finished turn"),
    "overlong": (lambda s: soft_overlong_punishment(s.max_length, s.overlong_cache), "DAPO's length penalty"),
    "math_verify": (lambda s: latex.require() or _reads_answers(latex.math_verify_reward)(s),
                    "a LaTeX answer, \\boxed{} first, equal to the gold by math-verify, as TRL's accuracy_reward; "
                    "pip install math-verify"),
}
BUILTIN_HELP = ", ".join(f"{name} ({words})" for name, (_, words) in BUILTIN.items())


def resolve(spec: str, settings: RewardSettings = RewardSettings()) -> tuple[str, RewardFn]:
    """(name, function) for a built-in name (made from `settings`) or `module:function`."""
    if spec in BUILTIN:
        return spec, BUILTIN[spec][0](settings)
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


def named(funcs: Sequence[RewardFn | str], settings: RewardSettings = RewardSettings()) -> list[tuple[str, RewardFn]]:
    """Each reward with a unique name for the log (`reward_<name>_mean`): specs resolved (`resolve`),
    functions by their __name__, repeats numbered."""
    out: list[tuple[str, RewardFn]] = []
    for f in funcs:
        name, fn = resolve(f, settings) if isinstance(f, str) else (getattr(f, "__name__", "reward"), f)
        taken = {n for n, _ in out}
        base, k = name, 2
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        out.append((name, fn))
    return out


@dataclass(frozen=True)
class TrainerState:
    """What TRL hands rewards as `trainer_state`: the fields its rewards read."""

    global_step: int  # optimizer steps done before this rollout
    max_steps: int
    epoch: float


# What a reward written for the other format raises on this one: `c[0]["content"]` on a string
# (TypeError: string indices must be integers), `c["content"]`, `c.strip()` on a list, `c[0][0]`...
SHAPE_ERRORS = (TypeError, KeyError, IndexError, AttributeError)


def format_hint(exc: Exception, completions: list[Any]) -> str:
    """For an error a reward raises on the shape of its input, the words naming the other
    --reward_format; else nothing."""
    if not isinstance(exc, SHAPE_ERRORS) or not completions:
        return ""
    if isinstance(completions[0], str):
        return ("; completions reach rewards as text: one written for chat messages (c[0]['content']) needs "
                "--reward_format messages")
    return ("; completions reach rewards as chat messages ([{'role': 'assistant', 'content': ...}], "
            "--reward_format messages): one written for text needs --reward_format text")


def _gather(awaitables: list[Any]) -> list[Any]:
    """Each awaitable's result (or the exception it raised), in the order given, awaited concurrently on
    an event loop of their own (in a thread when this one already runs a loop, as a notebook does)."""
    async def together() -> list[Any]:
        return await asyncio.gather(*awaitables, return_exceptions=True)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(together())
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, together()).result()


def score(funcs: list[tuple[str, RewardFn]], kwargs: dict[str, Any]) -> dict[str, list[float | None]]:
    """Each reward's values for the completions in `kwargs` (the keyword arguments above), checked: one
    finite number, or None, per completion."""
    n = len(kwargs["completions"])
    returned: dict[str, Any] = {}
    for name, fn in funcs:
        try:
            returned[name] = fn(**kwargs)  # an `async def` reward returns its coroutine: awaited below
        except Exception as exc:  # noqa: BLE001 - the user's code: one line naming it
            fail(f"reward {name} raised {type(exc).__name__}: {exc}{format_hint(exc, kwargs['completions'])}")
    waiting = {name: r for name, r in returned.items() if inspect.isawaitable(r)}
    if waiting:  # `async def` rewards run concurrently (as TRL runs them), each still under its own name
        returned.update(zip(waiting, _gather(list(waiting.values()))))
    scores = {}
    for name, _ in funcs:
        values = returned[name]
        if isinstance(values, BaseException):
            fail(f"reward {name} raised {type(values).__name__}: {values}{format_hint(values, kwargs['completions'])}")
        try:
            values = [None if v is None else float(v) for v in values]
        except (TypeError, ValueError):
            fail(f"reward {name} must return a list of numbers (or None), one per completion "
                 f"(got {type(values).__name__})")
        if len(values) != n:
            fail(f"reward {name} returned {len(values)} values for {n} completions")
        bad = next((v for v in values if v is not None and not math.isfinite(v)), None)
        if bad is not None:
            fail(f"reward {name} returned a non-finite value ({bad}); return None for a row it does not apply to")
        scores[name] = values
    return scores
