"""`SamplingParams`: what one sampling request asks for, checked once where it is made."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """`num_samples` completions per prompt of at most `max_new_tokens` tokens each, drawn from
    softmax(logits / temperature) (greedy at temperature 0) cut as transformers cuts it: the `top_k`
    most likely tokens (0: all), then the smallest set reaching `top_p` of their mass (1: all), then
    those at least `min_p` times as likely as the most likely one (0: all). `ignore_eos`: every row runs
    to exactly max_new_tokens (benchmarks). Invalid values raise a one-line ValueError naming the fix.

    An option is added here (its field, its check, its `generate_kwargs` entry), where it acts
    (`sampling.tokens.sample_token` for a cut) and in one test; exposing it as a flag adds a field to
    GRPOConfig (grpo/config.py, `sampling_params`) and to eval's arguments (eval/__main__.py)."""

    num_samples: int = 1  # completions per prompt, contiguous in the output
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy

    # the cuts, in transformers' order; each off at its default
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    ignore_eos: bool = False

    def __post_init__(self) -> None:
        for name, low in (("num_samples", 1), ("max_new_tokens", 1), ("top_k", 0)):
            value = getattr(self, name)
            # bool is an int to Python, never a count here
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        _number("temperature", self.temperature, lambda t: t >= 0, ">= 0 (0: greedy)")
        _number("top_p", self.top_p, lambda p: 0 < p <= 1, "in (0, 1] (1: no cut)")
        _number("min_p", self.min_p, lambda p: 0 <= p <= 1, "in [0, 1] (0: no cut)")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def generate_kwargs(self) -> dict[str, object]:
        """The same request as `model.generate`'s keyword arguments (sampling/generate.py, the reference)."""
        greedy = self.greedy
        return dict(max_new_tokens=self.max_new_tokens, num_return_sequences=self.num_samples, do_sample=not greedy,
                    temperature=None if greedy else self.temperature, top_p=None if greedy else self.top_p,
                    top_k=None if greedy else self.top_k,  # 0: no top-k cut (transformers' default is 50)
                    min_p=None if greedy or self.min_p == 0 else self.min_p)


def _number(name: str, value: object, ok: Callable[[float], bool], rule: str) -> None:
    """A one-line ValueError unless `value` is a finite real number that satisfies `ok`."""
    real = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not real or not ok(value):  # type: ignore[arg-type]
        raise ValueError(f"{name} must be {rule}, got {value!r}")
