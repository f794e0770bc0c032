"""`Sampler`: one model's sampling engine, its settings and its decode state, for rollouts, eval and the
benchmarks alike (vLLM's `LLM`, with `SamplingParams` per request)."""

from __future__ import annotations

from typing import Any

import torch

from sampling.batch import Completions
from sampling.continuous import sample_continuous
from sampling.cuda_graphs import DecodeGraphs
from sampling.engine import sample_batch
from sampling.fast_decode import supports
from sampling.generate import sample_with_generate
from sampling.params import SamplingParams


class Sampler:
    """Samples completions of `model`'s prompts: `sample(prompts, params)`.

    Engine settings, fixed for the sampler's life: the `eos_token_id` rows stop at and the
    `pad_token_id` they are padded with; `batch_size` prompts decode at a time (None: all at once);
    `continuous` refills rows from a queue as completions end (sampling/continuous.py; models on the
    lean decode step: with CUDA graphs, `fast=False` or another model it decodes static batches);
    `cuda_graphs` replays the lean step from CUDA graphs whose state (`DecodeGraphs`) is kept across
    calls; `fast` picks the lean step (None: whenever the model supports it); `sync_every` is how many
    decode steps pass between the host's looks at which rows finished (None: 1 on the CPU, `SYNC_EVERY`
    on CUDA); `reference` samples through `model.generate` instead (sampling/generate.py: what the
    engine is tested against; no logprobs).

    A trainer drives the graph state between rollouts: `before_backward()`, `measured(...)`,
    `release()`; `failed` says why a capture failed (the sampler then decodes eagerly)."""

    def __init__(self, model: Any, *, eos_token_id: int, pad_token_id: int, batch_size: int | None = None,
                 continuous: bool = False, cuda_graphs: bool = False, fast: bool | None = None,
                 sync_every: int | None = None, reference: bool = False):
        for name, value in (("batch_size", batch_size), ("sync_every", sync_every)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if reference and cuda_graphs:
            raise ValueError("the model.generate reference runs no CUDA graphs: pass cuda_graphs=False")
        self.model, self.eos_token_id, self.pad_token_id = model, eos_token_id, pad_token_id
        self.batch_size, self.continuous, self.fast, self.sync_every = batch_size, continuous, fast, sync_every
        self.reference = reference
        self.graphs = DecodeGraphs() if cuda_graphs else None

    @classmethod
    def for_tokenizer(cls, model: Any, tokenizer: Any, **settings: Any) -> Sampler:
        """A sampler whose rows stop at `tokenizer`'s eos and are padded with its pad token."""
        return cls(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **settings)

    def replace(self, **settings: Any) -> Sampler:
        """A sampler of the same model with `settings` changed and its own graph state: CUDA graphs stay
        on unless a capture of this one failed (it is not tried again)."""
        current = dict(eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, batch_size=self.batch_size,
                       continuous=self.continuous, cuda_graphs=self.graphs is not None and not self.failed,
                       fast=self.fast, sync_every=self.sync_every, reference=self.reference)
        return Sampler(self.model, **{**current, **settings})

    def sample(self, prompts: list[list[int]], params: SamplingParams, *, progress: Any = None,
               generator: torch.Generator | None = None, stop_at: list[int] | None = None) -> Completions:
        """`params.num_samples` completions per prompt, a prompt's samples contiguous, with the logprob
        of each sampled token at the sampling temperature (engine only). `progress`: an optional tqdm bar
        advanced by prompts done; `generator`: the draws' random numbers (None: torch's global ones);
        `stop_at[j]` ends completion j after that many tokens, whatever it samples (benchmarks). The
        model is sampled in eval mode and left in the mode it was in."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        was_training = self.model.training
        self.model.eval()
        try:
            return self._sample(prompts, params, progress, generator, stop_at)
        finally:
            self.model.train(was_training)

    def _sample(self, prompts: list[list[int]], params: SamplingParams, progress: Any,
                generator: torch.Generator | None, stop_at: list[int] | None) -> Completions:
        ids = dict(eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id)
        batch_size = self.batch_size or max(len(prompts), 1)
        if self.reference:
            if generator is not None or stop_at is not None:
                raise ValueError("the model.generate reference takes no generator or stop_at: sample with the "
                                 "engine (reference=False)")
            return sample_with_generate(self.model, prompts, params, **ids, batch_size=batch_size, progress=progress)
        if self.continuous and self.graphs is None and self.fast is not False and supports(self.model):
            return sample_continuous(self.model, prompts, params, **ids, rows=batch_size * params.num_samples,
                                     generator=generator, sync_every=self.sync_every, stop_at=stop_at,
                                     progress=progress)
        out = Completions([], [], [], [])
        G = params.num_samples
        for start in range(0, len(prompts), batch_size):
            chunk = sample_batch(self.model, prompts[start: start + batch_size], params, **ids, generator=generator,
                                 fast=self.fast, graphs=self.graphs, sync_every=self.sync_every,
                                 stop_at=None if stop_at is None else stop_at[start * G: (start + batch_size) * G])
            out.prompt_index += [start + i for i in chunk.prompt_index]
            out.token_ids += chunk.token_ids
            out.truncated += chunk.truncated
            out.logprobs += chunk.logprobs
            if progress is not None:
                progress.update(len(prompts[start: start + batch_size]))
        return out

    @property
    def failed(self) -> str | None:
        """Why a CUDA graph capture failed (None: none did, or no graphs)."""
        return self.graphs.failed if self.graphs is not None else None

    def before_backward(self) -> None:
        """Free the graphed decode state before a backward phase unless measured to fit beside one."""
        if self.graphs is not None:
            self.graphs.before_backward()

    def measured(self, peak_bytes: int, total_bytes: int, longest: bool) -> None:
        """After a training step: its peak bytes on a device of `total_bytes`, and whether a completion
        reached the longest length allowed (`DecodeGraphs.measured`)."""
        if self.graphs is not None:
            self.graphs.measured(peak_bytes, total_bytes, longest)

    def release(self) -> None:
        """Free the graphed decode state (weight copies, KV cache, graph pool); the next call rebuilds it."""
        if self.graphs is not None:
            self.graphs.release()
