"""The host half of a GRPO update (`plan_step`): from host lists only, which of this rank's rows go
through the forward and backward in which micro-batch, what each micro-batch's loss divides by
(`Counts`) and is multiplied by (its weight), and which backward lets DDP all-reduce. No tensor and
no device read: grpo/step.py's device loop runs the plan as it is, once per --num_iterations update.

The words the plan and the loss-type table (grpo/loss.py) use:
- a live row: a completion in the loss; --mask_truncated_completions takes cut ones out (their length
  is 0 here), and a row out of the loss counts in no normalizer.
- a micro-batch's range: --micro_batch_size consecutive rows of this rank's batch.
- `full`: the live rows of the range; `kept`: of those, the rows that go through the forward and
  backward (all of them, unless rows with advantage 0 skip it).
- `step_rows`: the live rows of the whole step, every rank's; `step_tokens`: the completion tokens in
  the loss of the whole step, every rank's (at least 1).
A micro-batch's loss is normalized by its `Counts` and multiplied by `weight = loss_type.weight(kept,
full, step_rows)`, so the step's micro-batches add up to the step's loss; its backward takes `weight x
world_size`, since DDP averages the ranks' gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

from grpo.loss import LOSS_TYPES_TABLE, Counts


@dataclass(frozen=True)
class MicroBatch:
    """One forward and backward: this rank's `rows` (in order), its loss's normalizers and weight."""

    rows: list[int]
    counts: Counts
    weight: float  # multiplies its loss and its loss metrics: the micro-batches sum to the step's loss
    scale: float  # weight x world size: what its backward takes
    tokens: int  # completion tokens in the loss of its rows (the token-weighted metrics)
    sync: bool  # DDP all-reduces the accumulated gradients in this backward: the update's last


@dataclass(frozen=True)
class StepPlan:
    """One update's micro-batches, and what the step counts over every rank."""

    micro_batches: list[MicroBatch]
    live: list[bool]  # per row of this rank: in the loss
    step_tokens: float
    step_rows: int

    @property
    def trained(self) -> list[bool]:
        """Per row of this rank: whether it goes through a backward."""
        through = {r for mb in self.micro_batches for r in mb.rows}
        return [r in through for r in range(len(self.live))]


def plan_step(lengths: list[int], advantages: list[float], loss_type: str, micro_batch_size: int, *,
              max_completion_length: int | None = None, world_size: int = 1, skip_zero_advantage: bool = False,
              step_tokens: float | None = None, step_rows: int | None = None) -> StepPlan:
    """The micro-batches of one update over this rank's rows: `lengths[i]` completion tokens in the loss
    (0 for a row out of it) and `advantages[i]`. `skip_zero_advantage`: rows with advantage 0 add nothing
    (LossSettings.zero_advantage_adds_nothing) and may skip. `step_tokens` and `step_rows` are every
    rank's totals (required when `world_size` > 1; else this rank's). A range with no row to train is
    left out."""
    if loss_type not in LOSS_TYPES_TABLE:
        raise ValueError(f"loss_type must be one of {tuple(LOSS_TYPES_TABLE)}, not {loss_type!r}")
    if len(lengths) != len(advantages):
        raise ValueError(f"{len(lengths)} lengths for {len(advantages)} advantages: give one of each per row")
    for name, value in (("micro_batch_size", micro_batch_size), ("world_size", world_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if any(n < 0 for n in lengths):
        raise ValueError("lengths count completion tokens in the loss: each must be >= 0 (0: out of the loss)")
    if world_size > 1 and (step_tokens is None or step_rows is None):
        raise ValueError("under DDP give step_tokens and step_rows: every rank's totals, not this rank's")
    live = [n > 0 for n in lengths]
    step_tokens = max(float(sum(lengths)) if step_tokens is None else step_tokens, 1.0)
    step_rows = sum(live) if step_rows is None else step_rows
    # under DDP every rank runs every micro-batch's backward (rows out of the loss run at 0), so the
    # ranks' gradient all-reduces stay in step; alone, rows that add nothing skip the forward too
    alone = world_size == 1
    skip = skip_zero_advantage and alone
    weight_of, B, parts = LOSS_TYPES_TABLE[loss_type].weight, len(lengths), []
    for s in range(0, B, micro_batch_size):
        span = range(s, min(s + micro_batch_size, B))
        rows = [r for r in span if (live[r] or not alone) and (not skip or advantages[r] != 0)]
        if not rows:
            continue
        full = sum(live[s: s + micro_batch_size])
        kept = sum(live[r] for r in rows)
        weight = weight_of(kept, full, step_rows)
        counts = Counts(tokens=max(sum(lengths[s: s + micro_batch_size]), 1.0), max_length=max_completion_length,
                        step_tokens=step_tokens)
        parts.append(MicroBatch(rows, counts, weight, weight * world_size, sum(lengths[r] for r in rows), False))
    if parts:
        last = parts[-1]
        parts[-1] = MicroBatch(last.rows, last.counts, last.weight, last.scale, last.tokens, True)
    return StepPlan(parts, live, step_tokens, step_rows)
