"""The rollout engine: our own decode loop instead of `model.generate`.

- Prefix sharing: each prompt is prefilled once, then its KV cache is repeated for its G samples.
- A preallocated (static) KV cache of prompt + max_new_tokens slots, filled in place, and a lean
  decode step (`fast_decode`) on Qwen3, Qwen2 and Llama models, optionally replayed from CUDA graphs
  (`cuda_graphs`); otherwise the model's own forward with a growing cache.
- Sampling on the device (`SamplingParams`: temperature, top-k, top-p, min-p), log-probabilities of
  the sampled tokens collected as it goes, an exit as soon as every row has finished, and finished
  rows dropped from the batch once at most half are still running (fewer rows for the long tail).
- On CUDA the host looks at which rows finished only every `SYNC_EVERY` steps: each look stalls the
  launch queue until the GPU catches up. Rows that finish in between decode on as padding.
"""

from __future__ import annotations

from typing import Any

import torch

from sampling.batch import SYNC_EVERY, Completions, decode_dtype, left_pad, positions_of, prefill, prefill_autocast
from sampling.cuda_graphs import DecodeGraphs
from sampling.fast_decode import DecodeState, supports
from sampling.params import SamplingParams
from sampling.tokens import sample_token


class _HFDecoder:
    """Decode through the model's own forward (other families, DoRA, 4-bit...) with a `transformers`
    DynamicCache: each step's attention reads only the slots written so far (a StaticCache of
    prompt + max_new_tokens slots would read every one of them at every step). Its decode steps keep the
    caller's autocast cache: recasting fp32 weights at every token costs more."""

    can_drop_rows = True

    def __init__(self, model: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 max_new_tokens: int, G: int):
        from transformers import DynamicCache

        self.model, self.L = model, ids.shape[1]
        self.cache = DynamicCache(config=model.config)
        with prefill_autocast(ids.device):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.cache,
                           use_cache=True, logits_to_keep=1).logits[:, -1]
        self.first_logits = logits.repeat_interleave(G, dim=0)
        if G > 1:
            self.keep(torch.arange(ids.shape[0], device=ids.device).repeat_interleave(G))
        ones = torch.ones(ids.shape[0], max_new_tokens, dtype=mask.dtype, device=mask.device)
        self.mask = torch.cat([mask, ones], dim=1).repeat_interleave(G, dim=0)

    def keep(self, rows: torch.Tensor) -> None:
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
        if hasattr(self, "mask"):
            self.mask = self.mask[rows]

    def step(self, token: torch.Tensor, position: torch.Tensor, t: int) -> torch.Tensor:
        return self.model(input_ids=token[:, None], attention_mask=self.mask[:, : self.L + t + 1],
                          position_ids=position[:, None], cache=self.cache, use_cache=True).logits[:, -1]


class _FastDecoder:
    """Decode through the lean step (`DecodeState`: fused weight copies and our own preallocated
    cache); prefill still uses the model. With `graphs` (a `DecodeGraphs`) the step replays from CUDA
    graphs on a state kept across rollouts, and rows are never dropped (fixed shapes)."""

    def __init__(self, model: Any, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, G: int,
                 graphs: DecodeGraphs | None = None):
        dtype = decode_dtype(model, ids.device)
        self.L = ids.shape[1]
        rows, slots = ids.shape[0] * G, self.L + max_new_tokens
        logits, keys, values = prefill(model, ids, mask)
        self.first_logits = logits.repeat_interleave(G, dim=0)
        if graphs is not None and graphs.failed:
            graphs = None  # a capture failed earlier in this run: eager
        if graphs is None:
            self.state, self.graphed = DecodeState(model, dtype, rows, slots, ids.device), None
        else:
            self.state, self.graphed = graphs.prepare(model, dtype, rows, slots, ids.device)
        self.graphs = graphs
        self.state.load(keys, values, mask, G)
        self.slot_ids = torch.arange(slots, device=ids.device)  # slot i as a [1] view: no host copy per step
        self.can_drop_rows = graphs is None

    def keep(self, rows: torch.Tensor) -> None:
        self.state.keep(rows)

    def step(self, token: torch.Tensor, position: torch.Tensor, t: int) -> torch.Tensor:
        slot = self.L + t
        if self.graphed is not None:
            try:
                return self.graphed(token, position, slot)
            except RuntimeError as error:  # the capture failed: this rollout and the run go on eagerly
                self.graphs.give_up(error)
                self.graphed = None
        with torch.autocast(token.device.type, enabled=False):  # the step fixes its own dtypes
            return self.state.step(token, position, self.slot_ids[slot: slot + 1], slot + 1)


def _rows_alive(finished: torch.Tensor) -> int:
    """How many rows are still decoding: a host read, so a device sync (counted by the tests)."""
    return int((~finished).sum())


@torch.no_grad()
def sample_batch(model: Any, prompts: list[list[int]], params: SamplingParams, *, eos_token_id: int,
                 pad_token_id: int, generator: torch.Generator | None = None, fast: bool | None = None,
                 graphs: DecodeGraphs | None = None, sync_every: int | None = None,
                 stop_at: list[int] | None = None) -> Completions:
    """`params.num_samples` completions per prompt in one static batch, grouped by prompt; logprobs at
    the sampling temperature (`sample_token`).

    `fast` picks the lean decode step (default: whenever the model supports it); `graphs` replays that
    step from CUDA graphs kept across calls (models without the lean step ignore it); `sync_every` is how
    many steps pass between looks at which rows finished (default 1 on the CPU, `SYNC_EVERY` on CUDA);
    `stop_at[i]` makes row i end after that many tokens, whatever it samples (benchmarks)."""
    device = next(model.parameters()).device
    P, G, N = len(prompts), params.num_samples, params.max_new_tokens
    ids, mask = left_pad(prompts, pad_token_id, device)
    positions = positions_of(mask)
    use_fast = supports(model) if fast is None else fast
    if use_fast:
        decoder = _FastDecoder(model, ids, mask, N, G, graphs)
    else:
        decoder = _HFDecoder(model, ids, mask, positions, N, G)
    logits = decoder.first_logits
    sync_every = sync_every or (SYNC_EVERY if device.type == "cuda" else 1)

    B = P * G
    next_pos = (positions[:, -1] + 1).repeat_interleave(G)
    tokens = torch.full((B, N), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((B, N), dtype=torch.float32, device=device)
    lengths = torch.full((B,), N, dtype=torch.long, device=device)
    alive = torch.arange(B, device=device)  # original row of each row still in the batch
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    limits = None if stop_at is None else torch.tensor(stop_at, device=device)

    # sample, record, stop rows at eos, feed the token back; the host looks at `finished` only every
    # `sync_every` steps (rows finished in between decode on, their tokens recorded as padding)
    for t in range(N):
        token, logp = sample_token(logits, params, generator)
        token = token.masked_fill(finished, pad_token_id)
        tokens[alive, t] = token
        logprobs[alive, t] = logp.masked_fill(finished, 0.0)
        if not params.ignore_eos or limits is not None:
            ends = (token == eos_token_id) if limits is None else (limits[alive] <= t + 1)
            just_done = ends & ~finished
            lengths[alive] = torch.where(just_done, t + 1, lengths[alive])
            finished |= just_done
            if (t + 1) % sync_every == 0:
                n_alive = _rows_alive(finished)
                if n_alive == 0:
                    break
                if decoder.can_drop_rows and n_alive <= finished.numel() // 2 and finished.numel() >= 8:
                    keep = (~finished).nonzero().squeeze(-1)  # drop finished rows
                    decoder.keep(keep)
                    alive, finished, token, next_pos = alive[keep], finished[keep], token[keep], next_pos[keep]
        if t + 1 == N:
            break
        logits = decoder.step(token, next_pos + t, t)
    return _completions(tokens, logprobs, lengths, params, eos_token_id)


def _completions(tokens: torch.Tensor, logprobs: torch.Tensor, lengths: torch.Tensor, params: SamplingParams,
                 eos_token_id: int) -> Completions:
    """The static batch's [B, N] tokens and logprobs cut to each row's length [B], rows grouped by prompt."""
    B, N, G = tokens.shape[0], params.max_new_tokens, params.num_samples
    out_tokens, out_logprobs, n = tokens.tolist(), logprobs.tolist(), lengths.tolist()
    truncated = [params.ignore_eos or n[i] == N and out_tokens[i][n[i] - 1] != eos_token_id for i in range(B)]
    return Completions(
        prompt_index=[i // G for i in range(B)],
        token_ids=[out_tokens[i][: n[i]] for i in range(B)],
        truncated=truncated,
        logprobs=[out_logprobs[i][: n[i]] for i in range(B)],
    )
