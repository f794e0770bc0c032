"""Completions through `transformers`' `model.generate`: the reference our engine is tested and
benchmarked against (`sampling.engine` is what GRPO and eval use)."""

from __future__ import annotations

from typing import Any

from sampling.batch import Completions, left_pad


def _cut_at_eos(row: list[int], eos_id: int) -> tuple[list[int], bool]:
    if eos_id in row:
        return row[: row.index(eos_id) + 1], False
    return row, True


def sample_with_generate(
    model: Any,
    prompts: list[list[int]],
    *,
    eos_token_id: int,
    pad_token_id: int,
    num_samples: int = 1,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    batch_size: int | None = None,
    progress: Any = None,
) -> Completions:
    """Sample `num_samples` completions per prompt (greedy when temperature == 0).

    `batch_size` caps the prompts per generate call (None: all at once); `progress` is an optional
    tqdm bar advanced by the number of prompts done.
    """
    import torch

    batch_size = batch_size or len(prompts)
    out = Completions([], [], [])
    greedy = temperature <= 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start: start + batch_size]
            ids, mask = left_pad(chunk, pad_token_id, model.device)
            generated = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                do_sample=not greedy, temperature=None if greedy else temperature, top_p=None if greedy else top_p,
                top_k=None if greedy else top_k,  # 0: no top-k cut (transformers' default is 50)
                min_p=None if greedy or min_p == 0 else min_p,
                num_return_sequences=num_samples, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            )
            for row_index, row in enumerate(generated[:, ids.shape[1]:].tolist()):
                tokens, truncated = _cut_at_eos(row, eos_token_id)
                out.prompt_index.append(start + row_index // num_samples)
                out.token_ids.append(tokens)
                out.truncated.append(truncated)
            if progress is not None:
                progress.update(len(chunk))
    model.train(was_training)
    return out
