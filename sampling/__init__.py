"""Sampling completions for rollouts and eval: one engine, so GRPO and eval sample alike.

    sample            the entry point: prompts in chunks (`sample_batch`) or continuous batching
    sample_batch      one static batch (engine.py): prefix sharing, the lean decode step, CUDA graphs
    sample_continuous rows refilled from a queue as completions end (continuous.py)
    sample_with_generate  `model.generate`, the reference the engine is tested against (generate.py)
"""

from sampling.batch import Completions
from sampling.cuda_graphs import DecodeGraphs
from sampling.engine import sample, sample_batch
from sampling.generate import sample_with_generate

__all__ = ["Completions", "DecodeGraphs", "sample", "sample_batch", "sample_with_generate"]
