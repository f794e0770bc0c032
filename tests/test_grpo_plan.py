"""The step's plan (grpo/plan.py), without a model: its micro-batches, weighted and normalized as planned,
add up to the step's loss for every loss type, with rows skipped, rows masked out and two DDP ranks."""

import pytest
import torch

from grpo.loss import LOSS_TYPES, LOSS_TYPES_TABLE, aggregate
from grpo.plan import plan_step

LIMIT = 9  # --max_completion_length


def _step(lengths, advantages, seed=0):
    """Per-token values of a step's rows: random, times the row's advantage (a row with advantage 0 adds
    exactly 0, as it does with beta 0), and the mask of each row's `lengths` tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), LIMIT, generator=g, dtype=torch.float64) * torch.tensor(advantages).double()[:, None]
    mask = (torch.arange(LIMIT)[None, :] < torch.tensor(lengths)[:, None]).double()
    return x, mask


def _planned(plan, x, mask, loss_type, scale=False):
    """What the plan's backward passes add up to: each micro-batch's aggregate times its weight (or, as
    the backward takes it, its scale)."""
    total = torch.zeros((), dtype=torch.float64)
    for mb in plan.micro_batches:
        part = aggregate(x[mb.rows], mask[mb.rows], loss_type, counts=mb.counts)
        total = total + part * (mb.scale if scale else mb.weight)
    return total


def _whole(x, mask, loss_type):
    """The step's loss in one call over all its rows."""
    return aggregate(x, mask, loss_type, max_completion_length=LIMIT, num_items_in_batch=mask.sum().item())


LENGTHS = [3, 9, 1, 5, 7, 2, 8, 4, 6, 9]
ADVANTAGES = [0.5, -1.0, 0.0, 2.0, 0.0, -0.3, 1.1, 0.0, -0.7, 0.2]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("micro", [1, 3, 4, 10])
def test_the_micro_batches_add_up_to_the_step_s_loss(loss_type, micro):
    x, mask = _step(LENGTHS, ADVANTAGES)
    plan = plan_step(LENGTHS, ADVANTAGES, loss_type, micro, max_completion_length=LIMIT)
    assert [r for mb in plan.micro_batches for r in mb.rows] == list(range(10))
    assert (plan.step_tokens, plan.step_rows) == (sum(LENGTHS), 10)
    got = _planned(plan, x, mask, loss_type)
    if LOSS_TYPES_TABLE[loss_type].exact or micro == 10:
        assert got.item() == pytest.approx(_whole(x, mask, loss_type).item(), rel=1e-12)
    else:  # bnpo: the row-weighted mean of each micro-batch's token mean
        spans = [range(s, min(s + micro, 10)) for s in range(0, 10, micro)]
        want = sum(len(r) / 10 * (x[list(r)] * mask[list(r)]).sum() / mask[list(r)].sum() for r in spans)
        assert got.item() == pytest.approx(want.item(), rel=1e-12)
        assert got.item() != pytest.approx(_whole(x, mask, loss_type).item(), rel=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_rows_with_advantage_zero_skip_and_the_sum_stays_the_same(loss_type):
    x, mask = _step(LENGTHS, ADVANTAGES)
    every = plan_step(LENGTHS, ADVANTAGES, loss_type, 4, max_completion_length=LIMIT)
    skipping = plan_step(LENGTHS, ADVANTAGES, loss_type, 4, max_completion_length=LIMIT, skip_zero_advantage=True)
    assert [mb.rows for mb in skipping.micro_batches] == [[0, 1, 3], [5, 6], [8, 9]]
    assert skipping.trained == [a != 0 for a in ADVANTAGES]
    assert _planned(skipping, x, mask, loss_type).item() == pytest.approx(
        _planned(every, x, mask, loss_type).item(), rel=1e-12)
    # bnpo's token mean is over the whole micro-batch, skipped rows' tokens included: its weight keeps the
    # micro-batch's share (full); grpo's and dr_grpo's count the trained rows only (kept)
    first = skipping.micro_batches[0]
    assert first.counts.tokens == sum(LENGTHS[:4]) and first.tokens == sum(LENGTHS[r] for r in (0, 1, 3))
    assert first.weight == {"grpo": 3 / 10, "dr_grpo": 3 / 10, "bnpo": 4 / 10, "dapo": 1.0}[loss_type]


def test_a_micro_batch_with_nothing_to_train_is_left_out():
    plan = plan_step([4, 4, 4, 4, 4, 4], [1.0, -1.0, 0.0, 0.0, 0.5, -0.5], "grpo", 2, skip_zero_advantage=True)
    assert [mb.rows for mb in plan.micro_batches] == [[0, 1], [4, 5]]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_rows_out_of_the_loss_count_in_no_normalizer(loss_type):
    """--mask_truncated_completions: cut rows' lengths are 0; alone they skip the backward, and the step's
    loss is that of the live rows only."""
    lengths = [0 if i in (1, 4, 5) else n for i, n in enumerate(LENGTHS)]
    x, mask = _step(lengths, ADVANTAGES)
    plan = plan_step(lengths, ADVANTAGES, loss_type, 3, max_completion_length=LIMIT)
    assert plan.live == [n > 0 for n in lengths] and plan.step_rows == 7
    assert all(lengths[r] > 0 for mb in plan.micro_batches for r in mb.rows)
    live = [i for i, n in enumerate(lengths) if n]
    if LOSS_TYPES_TABLE[loss_type].exact:
        assert _planned(plan, x, mask, loss_type).item() == pytest.approx(
            _whole(x[live], mask[live], loss_type).item(), rel=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_two_ddp_ranks_average_to_the_step_s_loss(loss_type):
    """Two ranks of 5 rows (one masked out on each): every rank runs every row (the masked at 0) and
    scales by the world size, so DDP's mean of the ranks' gradients is the single process's."""
    lengths = [0 if i in (2, 7) else n for i, n in enumerate(LENGTHS)]
    x, mask = _step(lengths, ADVANTAGES)
    totals = dict(step_tokens=float(sum(lengths)), step_rows=8)
    ranks = [plan_step(lengths[r * 5: r * 5 + 5], ADVANTAGES[r * 5: r * 5 + 5], loss_type, 2,
                       max_completion_length=LIMIT, world_size=2, skip_zero_advantage=True, **totals)
             for r in range(2)]
    for plan in ranks:
        assert [mb.rows for mb in plan.micro_batches] == [[0, 1], [2, 3], [4]]  # nothing skipped under DDP
        assert [mb.scale for mb in plan.micro_batches] == [2 * mb.weight for mb in plan.micro_batches]
    mean = sum(_planned(plan, x[r * 5: r * 5 + 5], mask[r * 5: r * 5 + 5], loss_type, scale=True)
               for r, plan in enumerate(ranks)) / 2
    live = [i for i, n in enumerate(lengths) if n]
    single = plan_step([lengths[i] for i in live], [ADVANTAGES[i] for i in live], loss_type, 2,
                       max_completion_length=LIMIT)
    if LOSS_TYPES_TABLE[loss_type].exact:
        assert mean.item() == pytest.approx(_whole(x[live], mask[live], loss_type).item(), rel=1e-12)
        assert mean.item() == pytest.approx(_planned(single, x[live], mask[live], loss_type).item(), rel=1e-12)


def test_only_the_last_micro_batch_syncs():
    plan = plan_step(LENGTHS, ADVANTAGES, "dapo", 3)
    assert [mb.sync for mb in plan.micro_batches] == [False, False, False, True]
    # the last range has nothing to train: the last planned micro-batch syncs instead
    skipping = plan_step([4] * 6, [1.0, -1.0, 0.5, 0.5, 0.0, 0.0], "dapo", 2, skip_zero_advantage=True)
    assert [(mb.rows, mb.sync) for mb in skipping.micro_batches] == [([0, 1], False), ([2, 3], True)]


def test_bad_input_is_refused_in_one_line():
    for kwargs, words in ((dict(loss_type="ppo"), "loss_type must be one of"),
                          (dict(advantages=[1.0]), "give one of each per row"),
                          (dict(world_size=2), "every rank's totals"),
                          (dict(micro_batch_size=0), "micro_batch_size must be an integer >= 1"),
                          (dict(world_size=0), "world_size must be an integer >= 1"),
                          (dict(lengths=[3, -1]), "each must be >= 0")):
        args = dict(lengths=[3, 4], advantages=[1.0, -1.0], loss_type="dapo", micro_batch_size=2) | kwargs
        with pytest.raises(ValueError, match=words):
            plan_step(**args)
