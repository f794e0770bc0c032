"""Completions through `transformers`' `model.generate`: the reference our engine is tested and
benchmarked against (`Sampler(..., reference=True)`; GRPO and eval use the engine)."""

from __future__ import annotations

from typing import Any

import torch

from sampling.batch import Completions, left_pad
from sampling.params import SamplingParams


def _cut_at_eos(row: list[int], eos_id: int) -> tuple[list[int], bool]:
    if eos_id in row:
        return row[: row.index(eos_id) + 1], False
    return row, True


def sample_with_generate(model: Any, prompts: list[list[int]], params: SamplingParams, *, eos_token_id: int,
                         pad_token_id: int, batch_size: int | None = None, progress: Any = None) -> Completions:
    """What `params` asks for (not `ignore_eos`), sampled by `model.generate`: completions grouped by
    prompt, without logprobs. `batch_size` caps the prompts per generate call (None: all at once);
    `progress` is an optional tqdm bar advanced by the number of prompts done."""
    if params.ignore_eos:
        raise ValueError("the model.generate reference stops at eos: use the engine (Sampler without "
                         "reference=True) for ignore_eos")
    batch_size = batch_size or len(prompts)
    out = Completions([], [], [])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start: start + batch_size]
            ids, mask = left_pad(chunk, pad_token_id, model.device)
            generated = model.generate(
                input_ids=ids, attention_mask=mask, **params.generate_kwargs(), eos_token_id=eos_token_id,
                pad_token_id=pad_token_id)
            for row_index, row in enumerate(generated[:, ids.shape[1]:].tolist()):
                tokens, truncated = _cut_at_eos(row, eos_token_id)
                out.prompt_index.append(start + row_index // params.num_samples)
                out.token_ids.append(tokens)
                out.truncated.append(truncated)
            if progress is not None:
                progress.update(len(chunk))
    model.train(was_training)
    return out
