"""Sampling completions for rollouts, eval and the benchmarks: one engine, so GRPO and eval sample alike.

    SamplingParams  what one request asks for (samples per prompt, length, temperature, top-k/p, min-p),
                    checked where it is made (params.py)
    Sampler         a model's engine: its settings (eos/pad ids, batch size, continuous batching, CUDA
                    graphs, the lean step, sync_every) and decode state; `sample(prompts, params)` (sampler.py)
    Completions     what `sample` returns: token ids, truncation, logprobs, grouped by prompt (batch.py)

Inside: the static batch (`engine.sample_batch`: prefix sharing, the lean decode step, CUDA graphs),
continuous batching (`continuous.sample_continuous`), the `model.generate` reference
(`generate.sample_with_generate`), and the token draw (`tokens.sample_token`).
"""

from sampling.batch import Completions
from sampling.params import SamplingParams
from sampling.sampler import Sampler

__all__ = ["Completions", "Sampler", "SamplingParams"]
