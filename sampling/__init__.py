"""Sampling completions for rollouts and eval: one function, so GRPO and eval sample alike."""

from sampling.generate import Completions, sample

__all__ = ["Completions", "sample"]
