"""GRPO loss math against values worked out by hand (comments show the arithmetic) and a float64 loop."""

import math

import pytest
import torch

from grpo.config import GRPOConfig
from grpo.loss import (
    LOSS_TYPES,
    Counts,
    LossBatch,
    LossSettings,
    aggregate,
    group_advantages,
    grpo_loss,
    high_entropy_mask,
)


def _loss(logp, old, ref, adv, mask, num_items_in_batch=None, sampler_logprobs=None, entropy=None, **settings):
    """grpo_loss on these tensors (`num_items_in_batch`: the step's tokens, dapo's normalizer) with
    LossSettings(**settings); the metrics as floats."""
    counts = None if num_items_in_batch is None else Counts(step_tokens=num_items_in_batch)
    batch = LossBatch(adv, mask, old, ref, sampler_logprobs, entropy, counts)
    return grpo_loss(logp, batch, LossSettings(**settings))

# ---------- group_advantages

REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])


def test_group_advantages_by_hand():
    # group 1: mean 1/4, centered [3/4, -1/4, -1/4, -1/4], unbiased std sqrt((9/16 + 3/16) / 3) = 1/2
    # group 2: mean 1/2, centered [1/2, 1/2, -1/2, -1/2], unbiased std sqrt(1/3)
    s3 = math.sqrt(1 / 3)
    want = [1.5, -0.5, -0.5, -0.5, 0.5 / s3, 0.5 / s3, -0.5 / s3, -0.5 / s3]
    assert group_advantages(REWARDS, 4, "group", eps=0.0).tolist() == pytest.approx(want)
    want_eps = [0.75 / 0.5001] + [-0.25 / 0.5001] * 3 + [0.5 / (s3 + 1e-4)] * 2 + [-0.5 / (s3 + 1e-4)] * 2
    assert group_advantages(REWARDS, 4).tolist() == pytest.approx(want_eps)


def test_batch_and_none_scales_by_hand():
    # batch mean 3/8; sum of squared deviations 3*(5/8)^2 + 5*(3/8)^2 = 15/8; unbiased var 15/56
    centered = [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5]
    std = math.sqrt(15 / 56)
    assert group_advantages(REWARDS, 4, "batch", eps=0.0).tolist() == pytest.approx([c / std for c in centered])
    assert group_advantages(REWARDS, 4, "none").tolist() == pytest.approx(centered)


def test_equal_rewards_give_zero_advantage():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    for scale in ("group", "batch", "none"):
        assert group_advantages(rewards, 3, scale).tolist() == [0.0] * 6


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError):
        group_advantages(torch.ones(5), 4)
    with pytest.raises(ValueError):
        group_advantages(torch.ones(4), 4, "rank")


# ---------- grpo_loss, by hand
# logp  = [[-1, -2, -0.5], [-1, -1, -1]]      old = [[-1.1, -2, -0.5], [-0.5, -1, -1]]
# mask  = [[1, 1, 1], [1, 1, 0]]               A   = [1, -1]
# ratio = [[e^0.1, 1, 1], [e^-0.5, 1, 1]] = [[1.105171, 1, 1], [0.606531, 1, 1]]
# row 0 (A=+1): -min(r, clamp(r, .8, 1.2)) = [-1.105171, -1, -1]
# row 1 (A=-1): -min(-r, -clamp(r, .8, 1.2)): r=.606531 clamps to .8 -> 0.8; then [1, (1 masked)]
# masked sum = -3.105171 + 1.8 = -1.305171 over 5 tokens
E01 = math.exp(0.1)
SUR_SUM = -(E01 + 2) + 1.8
LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
OLD = torch.tensor([[-1.1, -2.0, -0.5], [-0.5, -1.0, -1.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
ADV = torch.tensor([1.0, -1.0])
# ref = -1 everywhere: delta = ref - logp = [[0, 1, -0.5], [0, 0, (0)]]
# k3 = e^d - d - 1 = [[0, e - 2, e^-0.5 - 0.5], [0, 0, 0]]
REF = torch.full((2, 3), -1.0)
KL_ROW0 = (math.e - 2) + (math.exp(-0.5) - 0.5)

EXPECTED_POLICY = {
    "grpo": ((-(E01 + 2)) / 3 + 1.8 / 2) / 2,   # mean of sequence means
    "bnpo": SUR_SUM / 5,                         # token mean
    "dr_grpo": SUR_SUM / (2 * 4),                # B * max_completion_length (4)
    "dapo": SUR_SUM / 10,                        # num_items_in_batch = 10
}
EXPECTED_KL_AGG = {"grpo": (KL_ROW0 / 3 + 0) / 2, "bnpo": KL_ROW0 / 5, "dr_grpo": KL_ROW0 / 8, "dapo": KL_ROW0 / 10}


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_loss_by_hand(loss_type):
    loss, m = _loss(LOGP, OLD, REF, ADV, MASK, beta=0.1, loss_type=loss_type, max_completion_length=4,
                        num_items_in_batch=10)
    assert m["policy_loss"] == pytest.approx(EXPECTED_POLICY[loss_type])
    assert m["kl_loss"] == pytest.approx(0.1 * EXPECTED_KL_AGG[loss_type])
    assert loss.item() == pytest.approx(EXPECTED_POLICY[loss_type] + 0.1 * EXPECTED_KL_AGG[loss_type])
    assert m["grpo_loss"] == pytest.approx(m["policy_loss"] + m["kl_loss"])
    assert m["kl"] == pytest.approx(KL_ROW0 / 5)  # masked token mean
    # only row 1 token 0 is clipped: ratio .61 < .8 with A < 0 -> 1 of 5 tokens
    assert (m["clip_ratio_low"], m["clip_ratio_high"], m["clip_ratio_region"]) == pytest.approx((0.2, 0.0, 0.2))


def test_dapo_defaults_to_this_batch_token_count_and_dr_grpo_to_width():
    _, dapo = _loss(LOGP, OLD, None, ADV, MASK, beta=0.0, loss_type="dapo")
    assert dapo["policy_loss"] == pytest.approx(SUR_SUM / 5)
    _, dr = _loss(LOGP, OLD, None, ADV, MASK, beta=0.0, loss_type="dr_grpo")
    assert dr["policy_loss"] == pytest.approx(SUR_SUM / 6)  # B * T = 2 * 3


def test_high_clip_by_hand_with_asymmetric_epsilon():
    # ratio e^0.25 = 1.284 > 1 + 0.2 (A > 0) is clipped to 1.2, but not with epsilon_high 0.3
    logp, old = torch.tensor([[0.0]]), torch.tensor([[-0.25]])
    _, m = _loss(logp, old, None, torch.tensor([2.0]), torch.ones(1, 1), beta=0.0, loss_type="bnpo")
    assert m["policy_loss"] == pytest.approx(-1.2 * 2) and m["clip_ratio_high"] == 1.0
    _, m = _loss(logp, old, None, torch.tensor([2.0]), torch.ones(1, 1), beta=0.0, loss_type="bnpo",
                     epsilon_high=0.3)
    assert m["policy_loss"] == pytest.approx(-math.exp(0.25) * 2) and m["clip_ratio_high"] == 0.0


def test_on_policy_ratio_is_one_and_gradient_is_policy_gradient():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]], requires_grad=True)
    loss, m = _loss(logp, None, None, ADV, MASK, beta=0.0, loss_type="bnpo")
    assert m["clip_ratio_region"] == 0.0
    assert loss.item() == pytest.approx(-(3 * 1.0 + 2 * -1.0) / 5)  # -mean(A) over tokens
    loss.backward()
    want = -(ADV.unsqueeze(1) * MASK) / 5  # d/dlogp of -r*A with r = exp(logp - logp.detach())
    assert torch.allclose(logp.grad, want)


def test_gradient_is_zero_where_clipped():
    logp = torch.tensor([[0.0, 0.0], [0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])  # ratios e^2 (A>0: clipped high), e^-2 (A<0: clipped low)
    loss, m = _loss(logp, old, None, torch.tensor([1.0, -1.0]), torch.ones(2, 2), beta=0.0, loss_type="bnpo")
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[1, 0] == 0
    assert logp.grad[0, 1] != 0 and logp.grad[1, 1] != 0
    assert m["clip_ratio_high"] == 0.25 and m["clip_ratio_low"] == 0.25


def test_beta_zero_needs_no_reference_and_beta_needs_one():
    loss, m = _loss(LOGP, OLD, None, ADV, MASK, beta=0.0)
    assert m["kl_loss"] == 0.0 and m["kl"] == 0.0
    with pytest.raises(ValueError):
        _loss(LOGP, OLD, None, ADV, MASK, beta=0.1)


def test_empty_mask_rows_and_zero_advantages():
    mask = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        loss, _ = _loss(LOGP, OLD, REF, ADV, mask, beta=0.1, loss_type=loss_type)
        assert torch.isfinite(loss)
    loss, _ = _loss(LOGP, OLD, None, ADV, torch.zeros(2, 3), beta=0.0, loss_type="bnpo")
    assert loss.item() == 0.0
    loss, m = _loss(LOGP, None, None, torch.zeros(2), MASK, beta=0.0)
    assert loss.item() == 0.0 and m["policy_loss"] == 0.0


def test_unknown_loss_type():
    with pytest.raises(ValueError):
        aggregate(LOGP, MASK, "ppo")


def _reference_loss(logp, old, ref, adv, mask, beta, el, eh, loss_type, max_len, n_items):
    """Loop-by-loop float64 implementation straight from the formulas."""
    B, T = len(logp), len(logp[0])
    per_seq, total, count = [], 0.0, 0.0
    for b in range(B):
        seq_sum, seq_n = 0.0, 0.0
        for t in range(T):
            if mask[b][t] == 0:
                continue
            r = math.exp(logp[b][t] - old[b][t])
            a = adv[b]
            tok = -min(r * a, min(max(r, 1 - el), 1 + eh) * a)
            d = ref[b][t] - logp[b][t]
            tok += beta * (math.exp(d) - d - 1)
            seq_sum += tok
            seq_n += 1
        per_seq.append(seq_sum / max(seq_n, 1))
        total += seq_sum
        count += seq_n
    rows = max(1, sum(any(m) for m in mask))  # a row with no token (masked out) counts in no normalizer
    return {"grpo": sum(per_seq) / rows, "bnpo": total / max(count, 1), "dr_grpo": total / (rows * max_len),
            "dapo": total / n_items}[loss_type]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_float64_loop_reference(loss_type, seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 9
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    ref = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)
    n_items = float(mask.sum()) + 7
    loss, _ = _loss(logp, old, ref, adv, mask, beta=0.04, epsilon_low=0.2, epsilon_high=0.28,
                        loss_type=loss_type, max_completion_length=12, num_items_in_batch=n_items)
    want = _reference_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), 0.04, 0.2, 0.28,
                           loss_type, 12, n_items)
    assert loss.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_sequence_level_ratios_gspo_by_hand():
    """GSPO: one ratio per completion, exp(mean of its tokens' log-ratios), for each of its tokens.
    row 0: mean(0.1, 0, 0) = 1/30 -> s0 = e^(1/30) = 1.033895 (A = +1, inside the clip) -> -s0 a token;
    row 1: mean(-0.5, 0) = -0.25 -> s1 = e^-0.25 = 0.778801 < 0.8 (A = -1): clipped to 0.8 -> +0.8 a token."""
    s0, s1 = math.exp(0.1 / 3), math.exp(-0.25)
    assert s1 < 0.8  # row 1 is clipped
    logp = LOGP.clone().requires_grad_(True)
    loss, metrics = _loss(logp, OLD, None, ADV, MASK, beta=0.0, loss_type="dapo", num_items_in_batch=10,
                              importance_sampling_level="sequence")
    assert loss.item() == pytest.approx((-3 * s0 + 2 * 0.8) / 10, rel=1e-6)
    assert metrics["clip_ratio_low"] == pytest.approx(2 / 5) and metrics["clip_ratio_high"] == 0.0
    loss.backward()
    # row 0: d(-s0 x 3 tokens / 10) / d logp_t = -3 * s0 * (1/3) / 10 for each of its tokens; row 1 is clipped: 0
    assert torch.allclose(logp.grad[0], torch.full((3,), -s0 / 10), atol=1e-6)
    assert torch.allclose(logp.grad[1], torch.zeros(3))
    grpo, _ = _loss(LOGP, OLD, None, ADV, MASK, beta=0.0, loss_type="grpo", importance_sampling_level="sequence")
    assert grpo.item() == pytest.approx((-s0 + 0.8) / 2, rel=1e-6)
    same, _ = _loss(LOGP, LOGP, None, ADV, MASK, beta=0.0, importance_sampling_level="sequence")
    token, _ = _loss(LOGP, LOGP, None, ADV, MASK, beta=0.0)
    assert same.item() == pytest.approx(token.item())  # on-policy both levels give ratio 1
    with pytest.raises(ValueError, match="importance_sampling_level"):
        _loss(LOGP, OLD, None, ADV, MASK, beta=0.0, importance_sampling_level="group")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_a_row_with_no_token_counts_in_no_normalizer(loss_type):
    """Under DDP a completion taken out of the loss (--mask_truncated_completions) still runs, with an
    all-zero mask: every aggregation must equal the one without that row at all."""
    torch.manual_seed(0)
    x, mask = torch.randn(3, 5), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).float()
    out = torch.zeros(3, 5)
    with_empty = aggregate(torch.cat([x, torch.randn(1, 5)]), torch.cat([mask, out[:1]]), loss_type,
                           max_completion_length=8, num_items_in_batch=9.0)
    without = aggregate(x, mask, loss_type, max_completion_length=8, num_items_in_batch=9.0)
    assert with_empty.item() == pytest.approx(without.item(), rel=1e-6)


def test_the_cli_and_the_docs_take_the_loss_types_from_the_table():
    """One table: adding an entry there adds the CLI choice and the docs row (docs/training.md holds the
    generated table between its markers)."""
    import dataclasses
    from pathlib import Path

    from grpo.config import GRPOConfig
    from grpo.loss import LOSS_TYPES_TABLE, loss_types_markdown

    field = {f.name: f for f in dataclasses.fields(GRPOConfig)}["loss_type"]
    assert tuple(field.metadata["flag"]["choices"]) == tuple(LOSS_TYPES_TABLE) == LOSS_TYPES
    docs = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    inside = docs.split("<!-- loss-types -->\n")[1].split("\n<!-- /loss-types -->")[0]
    assert inside == loss_types_markdown()


# ---------- the sampler's drift and the rollout correction (sampler_drift)

# on-policy (ratio 1, never clipped), so each token's policy term is -A x its correction weight w.
# Row 0 (3 tokens, A = 1): the sampler agrees, w = 1. Row 1 (2 tokens, A = -2): the sampler's log-probs
# are log(s) below the trainer's on each token, so its token ratio is s and its sequence ratio s^2.
# Token sums: row 0 -3, row 1 4w; grpo (-1 + 2w) / 2, bnpo and dapo (-3 + 4w) / 5, dr_grpo (-3 + 4w) / (2 x 3).
CORR_LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -1.3, -9.0]])
CORR_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
CORR_ADV = torch.tensor([1.0, -2.0])
CORR_POLICY = {"grpo": lambda w: (-1 + 2 * w) / 2, "bnpo": lambda w: (-3 + 4 * w) / 5,
               "dr_grpo": lambda w: (-3 + 4 * w) / 6, "dapo": lambda w: (-3 + 4 * w) / 5}
# row 1's weight with cap 2: s = 1.5 (token ratio under the cap, sequence ratio 2.25 over it) and s = 3
# (both over it); truncate caps at 2, mask keeps the ratio under the cap and zeroes it over the cap
CORR_WEIGHT = {1.5: {"none": 1.0, "token_truncate": 1.5, "token_mask": 1.5, "sequence_truncate": 2.0,
                     "sequence_mask": 0.0},
               3.0: {"none": 1.0, "token_truncate": 2.0, "token_mask": 0.0, "sequence_truncate": 2.0,
                     "sequence_mask": 0.0}}


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("s", [1.5, 3.0])
@pytest.mark.parametrize("mode", ["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_a_row_the_sampler_drew_off_policy_is_truncated_or_masked_as_the_mode_says(loss_type, mode, s, level):
    sampler = CORR_LOGP.clone()
    sampler[1] -= math.log(s)
    logp = CORR_LOGP.clone().requires_grad_()
    loss, m = _loss(logp, None, None, CORR_ADV, CORR_MASK, beta=0.0, loss_type=loss_type,
                        importance_sampling_level=level, sampler_logprobs=sampler, rollout_correction=mode,
                        rollout_correction_cap=2.0)
    w = CORR_WEIGHT[s][mode]
    assert loss.item() == pytest.approx(CORR_POLICY[loss_type](w), abs=1e-6)
    loss.backward()  # the weight is a constant: row 1's gradient is its unweighted one times w
    unweighted = logp.detach().clone().requires_grad_()
    _loss(unweighted, None, None, CORR_ADV, CORR_MASK, beta=0.0, loss_type=loss_type,
              importance_sampling_level=level)[0].backward()
    assert torch.allclose(logp.grad[0], unweighted.grad[0], atol=1e-6)
    assert torch.allclose(logp.grad[1], w * unweighted.grad[1], atol=1e-6)
    # the raw figures, before any cap: 5 tokens, row 1's two at |log r| = log s, k3 = s - log s - 1
    assert m["sampler_tokens"] == 5 and m["sampler_logp_diff_sum"] == pytest.approx(2 * math.log(s))
    assert m["sampler_logp_diff_max"] == pytest.approx(math.log(s))
    assert m["sampler_kl_sum"] == pytest.approx(2 * (s - math.log(s) - 1), rel=1e-5)
    assert m["sampler_ratio_sum"] == pytest.approx(3 + 2 * s)
    assert (m["sampler_ratio_max"], -m["sampler_ratio_min_negated"]) == pytest.approx((s, 1.0))
    over = mode != "none" and (mode.startswith("sequence") or s > 2)  # row 1's ratio exceeds the cap
    acted = 2 if over else 0
    assert m["rollout_correction_truncated_tokens"] == (acted if mode.endswith("truncate") else 0)
    assert m["rollout_correction_masked_tokens"] == (acted if mode.endswith("mask") else 0)
    assert m["rollout_correction_masked_rows"] == (1 if over and mode.endswith("mask") else 0)


def test_rollout_correction_with_an_exact_sampler_leaves_the_loss_as_it_is():
    """A sampler that agrees with the trainer gives ratio 1 and weight 1 in every mode: the loss and its
    gradient are those of no correction; `none` (the default) is the same computation as before."""
    torch.manual_seed(0)
    logp, old, adv = torch.randn(4, 6) - 2, torch.randn(4, 6) - 2, torch.randn(4)
    mask = (torch.rand(4, 6) > 0.2).float()
    base = logp.clone().requires_grad_()
    want, _ = _loss(base, old, None, adv, mask, beta=0.0)
    want.backward()
    for mode in ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        x = logp.clone().requires_grad_()
        got, m = _loss(x, old, None, adv, mask, beta=0.0, sampler_logprobs=old, rollout_correction=mode)
        got.backward()
        assert got.item() == want.item() and torch.equal(x.grad, base.grad)
        assert m["sampler_kl_sum"] == 0 and m["sampler_logp_diff_max"] == 0


def test_unknown_rollout_correction():
    with pytest.raises(ValueError, match="rollout_correction must be one of"):
        _loss(LOGP, OLD, None, ADV, MASK, beta=0.0, sampler_logprobs=OLD, rollout_correction="clip")


def test_high_entropy_mask_keeps_the_top_share_of_the_masked_tokens_by_hand():
    entropy = torch.tensor([[0.1, 0.5, 0.9, 0.3], [0.7, 5.0, 0.2, 0.8]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1]])  # the 5.0 is padding: never counted, never kept
    # 7 tokens; the 0.5 quantile of (0.1 0.2 0.3 0.5 0.7 0.8 0.9) is 0.5: keep 0.5, 0.7, 0.8, 0.9
    assert high_entropy_mask(entropy, mask, 0.5).tolist() == [[0, 1, 1, 0], [1, 0, 0, 1]]
    # the 0.8 quantile is 0.78 (position 6 x 0.8 = 4.8, between 0.7 and 0.8): keep 0.8 and 0.9
    assert high_entropy_mask(entropy, mask, 0.2).tolist() == [[0, 0, 1, 0], [0, 0, 0, 1]]
    assert high_entropy_mask(entropy, mask, 1.0).tolist() == mask.tolist()
    assert high_entropy_mask(entropy, torch.zeros_like(mask), 0.5).sum() == 0


def test_the_entropy_mask_drops_only_the_surrogate_and_the_bonus_subtracts_entropy():
    """top_entropy_quantile: the other tokens lose their surrogate, not their KL nor their place in the normalizer;
    entropy_coef: loss - coef * aggregate(entropy), its gradient flowing into the entropy."""
    torch.manual_seed(0)
    logp = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(2, 4, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    keep = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 1]])
    entropy = torch.rand(2, 4, dtype=torch.float64, requires_grad=True)
    common = dict(beta=0.1, loss_type="dapo", num_items_in_batch=7.0)
    base, m0 = _loss(logp, None, ref, adv, mask, **common)
    # entropy 1 on the kept tokens, 0 on the others: the top 5/7 of the 7 tokens by entropy are the kept ones
    masked, m1 = _loss(logp, None, ref, adv, mask, entropy=keep.double(), top_entropy_quantile=5 / 7, **common)
    # on-policy the surrogate is -A per token: its dapo sum over the kept tokens only, over all 7 tokens
    assert m1["policy_loss"] == pytest.approx(-(1.0 * 2 + -0.5 * 3) / 7.0)
    assert m0["policy_loss"] == pytest.approx(-(1.0 * 3 - 0.5 * 4) / 7)
    assert m1["kl_loss"] == pytest.approx(m0["kl_loss"])
    bonus, m2 = _loss(logp, None, ref, adv, mask, entropy=entropy, entropy_coef=0.05, **common)
    want = 0.05 * (entropy * mask).sum() / 7.0
    assert bonus.item() == pytest.approx(base.item() - want.item())
    assert m2["entropy_loss"] == pytest.approx(-want.item())
    (grad,) = torch.autograd.grad(bonus, entropy)
    assert torch.allclose(grad, -0.05 * mask.double() / 7.0)
    assert "entropy_loss" not in m0


def test_loss_settings_check_their_choices_once_and_follow_the_config():
    """The settings object is where a bad choice is refused (one line naming the choices); built from a
    GRPOConfig it carries each flag of the same name (--epsilon as epsilon_low)."""
    for bad in (dict(loss_type="ppo"), dict(importance_sampling_level="group"), dict(rollout_correction="clip"),
                dict(top_entropy_quantile=0.0), dict(beta=-0.1), dict(epsilon_low=-0.5), dict(epsilon_high=0.0),
                dict(rollout_correction_cap=-3.0)):
        with pytest.raises(ValueError) as info:
            LossSettings(**{"beta": 0.0, **bad})
        assert next(iter(bad)) in str(info.value) and "\n" not in str(info.value)
    cfg = GRPOConfig(beta=0.04, epsilon=0.1, epsilon_high=0.3, loss_type="grpo", max_completion_length=77,
                     importance_sampling_level="sequence", rollout_correction="token_mask",
                     rollout_correction_cap=3.0, entropy_coef=0.01, top_entropy_quantile=0.5)
    assert LossSettings.from_config(cfg) == LossSettings(0.04, 0.1, 0.3, "grpo", 77, "sequence", "token_mask", 3.0,
                                                         0.01, 0.5)
    assert LossSettings(beta=0.0, epsilon_low=0.2).eps_high == 0.2
    assert LossSettings(beta=0.0).zero_advantage_adds_nothing
    assert not any(LossSettings(**kw).zero_advantage_adds_nothing for kw in
                   (dict(beta=0.01), dict(beta=0.0, entropy_coef=0.1), dict(beta=0.0, top_entropy_quantile=0.2)))
    with pytest.raises(ValueError, match="LossBatch.entropy is required when entropy_coef"):
        _loss(LOGP, OLD, None, ADV, MASK, beta=0.0, entropy_coef=0.1)


def test_a_micro_batch_s_counts_take_dr_grpo_s_length_from_the_settings():
    """Counts without a length limit (the plan's when none is set) take the settings'; their own wins."""
    batch = LossBatch(ADV, MASK, OLD, counts=Counts(step_tokens=10.0))
    with_limit, _ = grpo_loss(LOGP, batch, LossSettings(beta=0.0, loss_type="dr_grpo", max_completion_length=4))
    assert with_limit.item() == pytest.approx(SUR_SUM / 8)  # 2 rows x 4
    batch.counts = Counts(max_length=5.0)
    own, _ = grpo_loss(LOGP, batch, LossSettings(beta=0.0, loss_type="dr_grpo", max_completion_length=4))
    assert own.item() == pytest.approx(SUR_SUM / 10)


def test_a_micro_batch_s_tensors_are_its_rows_and_columns():
    whole = LossBatch(ADV, MASK, OLD, REF, sampler_logprobs=LOGP)
    part = whole.take(torch.tensor([1]), 2, Counts(step_tokens=5.0))
    assert torch.equal(part.advantages, ADV[1:]) and torch.equal(part.mask, MASK[1:, :2])
    assert torch.equal(part.old_logprobs, OLD[1:, :2]) and torch.equal(part.ref_logprobs, REF[1:, :2])
    assert torch.equal(part.sampler_logprobs, LOGP[1:, :2]) and part.entropy is None
    assert part.counts == Counts(step_tokens=5.0)
