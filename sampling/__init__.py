"""Sampling completions for rollouts and eval: one engine, so GRPO and eval sample alike."""

from sampling.engine import rollout, sample
from sampling.generate import Completions, sample_with_generate

__all__ = ["Completions", "rollout", "sample", "sample_with_generate"]
