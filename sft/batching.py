"""SFT examples as token ids + labels, and dynamic padding into batches."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from data import Record
from data.prompt import DEFAULT_FORMAT, PromptFormat, encode_sft_example
from models.logprobs import logprobs_at


def encode_records(tokenizer: Any, records: list[Record], max_length: int, strip_calculator: bool = True,
                   fmt: PromptFormat = DEFAULT_FORMAT) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(the examples that fit in `max_length` tokens, how many did not: skipped, never cut mid-answer)."""
    encoded = [encode_sft_example(tokenizer, r["question"], r["solution"], max_length, strip_calculator, fmt)
               for r in records]
    kept = [e for e in encoded if e is not None]
    return kept, len(encoded) - len(kept)


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad to the longest example: input_ids, attention_mask, labels (-100 on padding)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def completion_loss_sum(model: Any, batch: dict[str, Any]) -> Any:
    """Summed next-token cross-entropy over the target (label != -100) tokens of `batch`, through the
    same path as GRPO's loss (`models.logprobs.logprobs_at`): only the columns that predict a target token
    (from the shortest prompt's end on, not the prompts) are projected onto the vocabulary, a chunk of
    the vocabulary at a time inside the loss and again in its backward, so neither the [B, T, V] logits
    nor their gradient (nor an fp32 copy) is ever held."""
    labels = batch["labels"][:, 1:]
    targets = labels != -100
    columns = targets.any(0).nonzero().squeeze(-1)  # logits at column c predict token c + 1
    if columns.numel() == 0:
        return torch.zeros((), device=labels.device, requires_grad=True)
    logp, _ = logprobs_at(model, labels[:, columns].clamp(min=0), columns, input_ids=batch["input_ids"],
                          attention_mask=batch["attention_mask"])
    return -(logp * targets[:, columns]).sum()


def completion_loss_sum_full(model: Any, batch: dict[str, Any]) -> Any:
    """The same loss the plain way (full-vocabulary logits at every position and an fp32 copy): the
    reference the chunked path is tested and benchmarked against."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = batch["labels"][:, 1:]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=-100, reduction="sum")
