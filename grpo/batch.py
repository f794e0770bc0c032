"""Pack a rollout into tensors: left-padded prompts + right-padded completions, masks, positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.logprobs import head_input, head_weight, logprobs_of


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # [B, P + C]: prompt (left-padded) then completion (right-padded)
    attention_mask: torch.Tensor  # [B, P + C]
    position_ids: torch.Tensor  # [B, P + C]: positions counted from each row's first real token
    completion_ids: torch.Tensor  # [B, C]
    completion_mask: torch.Tensor  # [B, C]: 1 on completion tokens (eos included)
    # the same lengths on the host, so cutting a micro-batch to its widths reads nothing back from the
    # device (each read is a sync: the host waits for every queued kernel); None: read the masks
    prompt_lengths: list[int] | None = None
    completion_lengths: list[int] | None = None  # tokens in the loss: 0 for a row taken out of it
    groups: list[int] | None = None  # each row's prompt, numbered in order (rows of a group share one)
    # [B, C]: the log-prob the rollout engine drew each completion token with (0 on padding); None when
    # the completions did not come from the engine (a rollout stand-in's fixed ones)
    sampler_logprobs: torch.Tensor | None = None

    def take(self, index: slice | torch.Tensor, rows: list[int] | None = None) -> RolloutBatch:
        """These rows (`rows`: the same ones as host indices, when `index` is a tensor), cut to the columns
        they use: the prompt padding all of them have on the left and the completion padding all of them
        have on the right, so a micro-batch of short completions does not pay for the batch's longest.
        Completion column j stays column j of the whole batch."""
        mask, completion_mask = self.attention_mask[index], self.completion_mask[index]
        P = mask.shape[1] - self.completion_width
        if isinstance(index, slice):
            rows = range(self.input_ids.shape[0])[index]
        if rows is not None and self.prompt_lengths is not None:  # pack() sets the lengths together
            first = P - max(self.prompt_lengths[r] for r in rows)
            width = max(1, max(self.completion_lengths[r] for r in rows))
        else:
            first = int(mask[:, :P].any(0).int().argmax())  # every prompt has a token, so this is < P
            used = completion_mask.any(0).nonzero()
            width = int(used.max()) + 1 if used.numel() else 1
        cols = slice(first, P + width)

        def pick(xs: list[int] | None) -> list[int] | None:
            return None if xs is None or rows is None else [xs[r] for r in rows]

        sampler = None if self.sampler_logprobs is None else self.sampler_logprobs[index, :width]
        return RolloutBatch(self.input_ids[index, cols], mask[:, cols], self.position_ids[index, cols],
                            self.completion_ids[index, :width], completion_mask[:, :width],
                            pick(self.prompt_lengths), pick(self.completion_lengths), pick(self.groups),
                            sampler_logprobs=sampler)

    @property
    def completion_width(self) -> int:
        return self.completion_ids.shape[1]

    def mask_rows(self, cut: list[bool]) -> None:
        """Take the rows where `cut` is True out of the loss (their completion mask and length zeroed)."""
        self.completion_mask[torch.tensor(cut, dtype=torch.bool, device=self.completion_mask.device)] = 0
        if self.completion_lengths is not None:
            self.completion_lengths = [0 if c else n for n, c in zip(self.completion_lengths, cut)]


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
         device: str | torch.device, logprobs: list[list[float]] | None = None) -> RolloutBatch:
    """prompts[i] and completions[i] belong together (a prompt repeated for each of its samples);
    `logprobs[i]`, when given, the sampler's log-prob of each token of completions[i]."""
    B = len(completions)
    P = max(len(p) for p in prompts)
    C = max(1, max(len(c) for c in completions))
    input_ids = torch.full((B, P + C), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + C), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, P - len(p): P] = torch.tensor(p)
        input_ids[i, P: P + len(c)] = torch.tensor(c, dtype=torch.long)
        attention_mask[i, P - len(p): P + len(c)] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    completion_mask = attention_mask[:, P:].clone()
    groups = [0]
    for i in range(1, B):
        groups.append(groups[-1] + (prompts[i] != prompts[i - 1]))
    sampler = None
    if logprobs is not None:
        sampler = torch.zeros((B, C), dtype=torch.float32)
        for i, lp in enumerate(logprobs):
            sampler[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
        sampler = sampler.to(device)
    return RolloutBatch(input_ids.to(device), attention_mask.to(device), position_ids.to(device),
                        input_ids[:, P:].to(device), completion_mask.to(device), [len(p) for p in prompts],
                        [len(c) for c in completions], groups, sampler)


def completion_logprobs(model, batch: RolloutBatch, temperature: float = 1.0, with_entropy: bool = False,
                        share_prompts: bool = True, entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [B, C] of each completion token, their entropy or an empty tensor), from the forward
    `completion_logits` makes (prompts shared within groups), projected by the loss itself where
    `head_weight` allows, so neither the [B, C, V] logits nor their gradient is held."""
    weight = head_weight(model)
    out = _completion_forward(model, batch, share_prompts, hidden=weight is not None)
    return logprobs_of(out, weight, batch.completion_ids, temperature, with_entropy, entropy_grad)


def completion_logits(model, batch: RolloutBatch, share_prompts: bool = True) -> torch.Tensor:
    """Logits that predict each completion token: [B, C, V]; the model projects only those C positions
    onto the vocabulary (the last prompt token's and all but the last completion token's). The path
    for heads `completion_logprobs` cannot project itself, and its reference in the tests.

    Rows that share a prompt (a GRPO group) run it once: the prompt's KV cache is computed for one row
    and repeated for the others, gradients included, so a group of G pays for its prompt once instead
    of G times. Without such rows, or under gradient checkpointing (which drops the cache), it is one
    plain forward over prompt + completion."""
    return _completion_forward(model, batch, share_prompts, hidden=False)


def _completion_forward(model, batch: RolloutBatch, share_prompts: bool, hidden: bool) -> torch.Tensor:
    """`completion_logits`, or with `hidden` the decoder's hidden states at the same positions."""
    width, C = batch.input_ids.shape[1], batch.completion_width
    group = _prompt_groups(batch) if share_prompts and not _checkpointing(model) else None
    if group is None:
        keep = torch.arange(width - C - 1, width - 1, device=batch.input_ids.device)
        return head_input(model, hidden, keep, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids)
    from transformers import DynamicCache

    P = width - C  # the prompt's last token goes with the completion: its logits predict the first token
    first = torch.ones_like(group, dtype=torch.bool)
    first[1:] = group[1:] != group[:-1]
    cache = DynamicCache(config=_config(model))
    prefix = dict(input_ids=batch.input_ids[first, : P - 1], attention_mask=batch.attention_mask[first, : P - 1],
                  position_ids=batch.position_ids[first, : P - 1], cache=cache, use_cache=True)
    head_input(model, hidden, 1, **prefix)  # fills the cache; its one position's output goes unused
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.index_select(0, group), layer.values.index_select(0, group)
    return head_input(model, hidden, None, input_ids=batch.input_ids[:, P - 1: width - 1],
                    attention_mask=batch.attention_mask[:, : width - 1],
                    position_ids=batch.position_ids[:, P - 1: width - 1], cache=cache, use_cache=True)


def _prompt_groups(batch: RolloutBatch) -> torch.Tensor | None:
    """Index of each row's prompt among the batch's distinct consecutive prompts, or None when no two
    neighbouring rows share one (or the prompt is a single token: nothing to share)."""
    P = batch.input_ids.shape[1] - batch.completion_width
    if batch.input_ids.shape[0] < 2 or P < 2:
        return None
    if batch.groups is not None and len(set(batch.groups)) == len(batch.groups):
        return None  # known on the host: no device read
    ids, mask = batch.input_ids[:, :P], batch.attention_mask[:, :P]
    new = ((ids[1:] != ids[:-1]) | (mask[1:] != mask[:-1])).any(1)
    if batch.groups is None and bool(new.all()):
        return None
    return torch.cat([new.new_zeros(1), new]).long().cumsum(0)


def _checkpointing(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _config(model):
    while not hasattr(model, "config"):  # DDP keeps the model in .module
        model = model.module
    return model.config
