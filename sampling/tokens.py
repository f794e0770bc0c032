"""Choosing the next token from last-position logits, as every decode loop here does: greedy, or a draw
from softmax(logits / T) cut by top-k, top-p and min-p in transformers' order, with its log-probability.
On the CPU one uniform per row, and in two levels over wide vocabularies (no cumulative sum over all
151,936 entries); on GPUs an exponential race, a few kernels over the whole row (`WAYS`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sampling.params import SamplingParams

BLOCK = 1024  # entries per block of the two-level draw


def _per_block(x: torch.Tensor, reduce: Any) -> torch.Tensor:
    """`reduce` (torch.sum or torch.amax) over each BLOCK of x's [B, V] columns, the last block possibly
    short: [B, ceil(V / BLOCK)]. A view of the whole blocks, no padded copy."""
    B, V = x.shape
    n = V // BLOCK
    out = reduce(x[:, : n * BLOCK].view(B, n, BLOCK), dim=-1)
    if V > n * BLOCK:
        out = torch.cat([out, reduce(x[:, n * BLOCK:], dim=-1, keepdim=True)], dim=-1)
    return out


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(one index per row of `weights` [B, W] (>= 0, unnormalized), drawn with probability proportional to
    its weight, each row's total weight [B, 1]), from one uniform per row (torch.multinomial draws one
    random number per entry on CPU).

    Wide rows go by inverse CDF in two levels: pick a block of BLOCK entries (the last one may be short)
    from the block sums, then the entry inside it, so no cumulative sum runs over the whole
    151,936-entry vocabulary."""
    B, W = weights.shape
    u = torch.rand((B, 1), device=weights.device, generator=generator, dtype=weights.dtype)
    u.clamp_(min=torch.finfo(u.dtype).tiny)  # rand can return 0.0, which would pick a leading zero-weight entry
    if W < 2 * BLOCK:
        cdf = weights.cumsum(-1)
        return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1).clamp_(max=W - 1), cdf[:, -1:]
    sums = _per_block(weights, torch.sum)
    cdf = sums.cumsum(-1)
    total = cdf[:, -1:]
    u = u * total
    b = torch.searchsorted(cdf, u).clamp_(max=sums.shape[1] - 1)  # [B, 1]
    columns = b * BLOCK + torch.arange(BLOCK, device=weights.device)  # [B, BLOCK], past W in a short block
    inner = weights.gather(1, columns.clamp(max=W - 1)).masked_fill_(columns >= W, 0.0).cumsum(-1)
    # what is left of u inside the block, kept within (0, block total] against rounding so the pick
    # never lands on a zero-weight entry at either end (nor past the end of a short block)
    left = (u - (cdf.gather(1, b) - sums.gather(1, b))).clamp_(min=torch.finfo(weights.dtype).tiny)
    j = torch.searchsorted(inner, torch.minimum(left, inner[:, -1:]))
    return (b * BLOCK + j).squeeze(-1), total


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) for [B, V] (the first of equal maxima), in two levels for wide rows: the first block
    holding the row's maximum, then the maximum inside it."""
    # the CPU's argmax runs on one thread while its max over blocks is vectorized
    V = x.shape[1]
    if V < 2 * BLOCK:
        return x.argmax(dim=-1)
    b = _per_block(x, torch.amax).argmax(dim=-1, keepdim=True)  # the first block holding the maximum
    # that block's columns (the short last block repeats its final column after it: never first)
    columns = (b * BLOCK + torch.arange(BLOCK, device=x.device)).clamp_(max=V - 1)
    return columns.gather(1, x.gather(1, columns).argmax(dim=-1, keepdim=True)).squeeze(-1)


def _race(weights: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`_draw`'s contract the GPU way: the argmax of weight / E with E ~ Exp(1) drawn per entry (an
    exponential race: entry i wins with probability w_i / sum w; a zero weight never wins)."""
    # a few whole-row kernels where `_draw` issues many small ones: a GPU draws a random number per
    # entry cheaply, where the CPU's one uniform per row is what keeps `_draw` fast there
    noise = torch.empty_like(weights).exponential_(generator=generator).clamp_(min=torch.finfo(weights.dtype).tiny)
    return (weights / noise).argmax(dim=-1), weights.sum(-1, keepdim=True)


@dataclass(frozen=True)
class Way:
    """How rows of a device type choose their token: a draw (index, row total) and a greedy argmax."""

    draw: Any
    argmax: Any


# By device type; others take "cuda"'s. The CPU's two-level passes are written for its one-thread
# argmax and cumulative sums; on a GPU each pass is a kernel launch, so few whole-row passes win.
# benchmarks.launches counts the GPU way on the CPU by pointing "cpu" at it.
WAYS = {"cpu": Way(draw=_draw, argmax=_argmax), "cuda": Way(draw=_race, argmax=lambda x: x.argmax(dim=-1))}


def sample_token(logits: torch.Tensor, params: SamplingParams,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(token [B], its log-probability [B]) from last-position logits [B, V] as `params` asks; greedy
    when its temperature is 0.

    Sampling draws from softmax(logits / temperature) cut as transformers' warpers cut it, in their order:
    the `top_k` most likely tokens (0: all; ties with the k-th kept), then the smallest set whose mass
    reaches `top_p` of what is left, then those at least `min_p` times as likely as the most likely one;
    the draw is over what remains, renormalized. The log-probability is that of the distribution the
    token was drawn from: softmax(logits / temperature), or with a cut its renormalized cut (log p -
    log of the kept mass). The loss counts the whole softmax, so under a cut the two differ by the kept
    mass (grpo/loss.py's sampler_drift measures it; docs/training.md)."""
    way = WAYS.get(logits.device.type, WAYS["cuda"])
    temperature, top_p, top_k, min_p = params.temperature, params.top_p, params.top_k, params.min_p
    if temperature <= 0:
        logits = logits.float()
        token = way.argmax(logits)
        return token, logits.gather(-1, token[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    logits = logits.float()
    top = logits.amax(dim=-1, keepdim=True)
    # softmax(logits / T) * total as (logits - top) / T in one pass, then exp in place: never overflows
    weights = torch.add(top / -temperature, logits, alpha=1 / temperature).exp_()  # the most likely: 1.0
    if top_p < 1.0 or 0 < top_k < weights.shape[-1] or min_p > 0.0:
        if 0 < top_k < weights.shape[-1]:
            weights.masked_fill_(weights < weights.topk(top_k, dim=-1).values[:, -1:], 0.0)
        if top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
            sorted_w, order = weights.sort(dim=-1, descending=True)
            sorted_w.masked_fill_(sorted_w.cumsum(-1) - sorted_w >= top_p * sorted_w.sum(-1, keepdim=True), 0.0)
            weights.scatter_(-1, order, sorted_w)
        if min_p > 0.0:
            weights.masked_fill_(weights < min_p, 0.0)
        token, total = way.draw(weights, generator)  # the total of what the cut kept: the draw's normalizer
    else:
        token, total = way.draw(weights, generator)
    logp = ((logits.gather(-1, token[:, None]) - top) / temperature - total.log()).squeeze(-1)
    return token, logp
