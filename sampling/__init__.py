"""Sampling completions for rollouts and eval: one engine, so GRPO and eval sample alike."""

from sampling.cuda_graphs import DecodeGraphs
from sampling.engine import Completions, rollout, sample
from sampling.generate import sample_with_generate

__all__ = ["Completions", "DecodeGraphs", "rollout", "sample", "sample_with_generate"]
