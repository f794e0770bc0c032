"""One GRPO step (grpo/step.py): micro-batching, the prompt order across epochs, the phase timings."""

import json
import math
import time

import pytest
import torch

from grpo.loss import LOSS_TYPES_TABLE
from grpo.prompt_order import _epoch_order, step_prompts
from grpo.trainer import LOG_NAME, GRPOConfig, train_grpo


def _varied_rollouts(tokenizer):
    """Fixed completions of different lengths, right and wrong in every group."""
    def hook(step, prompts, answers):
        rows = []
        for answer in answers:
            for k in range(4):
                text = (f"#### {answer}" if k % 2 == 0 else "#### 0") + " and more" * (3 * k)
                rows.append(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        return rows
    return hook


def _one_step(out, tiny_tokenizer, hook=None, **overrides):
    cfg = dict(model_name="tiny", dataset="synthetic", grpo_output=str(out), max_steps=1, prompts_per_step=4,
               num_generations=4, max_completion_length=64, device="cpu", learning_rate=1e-3, beta=0.04,
               show_progress=False, seed=3, save_every=10)
    train_grpo(GRPOConfig(**{**cfg, **overrides}), rollout_hook=(hook or _varied_rollouts)(tiny_tokenizer))
    from safetensors.torch import load_file

    return json.loads((out / LOG_NAME).read_text()), load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("loss_type", LOSS_TYPES_TABLE)
def test_micro_batch_size_does_not_change_the_update(tmp_path, tiny_tokenizer, loss_type):
    """16 completions in micro-batches of 2 or of 16: the same loss, gradient norm and weights for every
    loss type whose table entry says its split is exact (grpo, dr_grpo, dapo). bnpo normalizes each
    micro-batch by its own tokens (TRL's per-device batch), so it differs with the micro-batch size; in
    one micro-batch it is dapo."""
    small, w_small = _one_step(tmp_path / "2", tiny_tokenizer, micro_batch_size=2, loss_type=loss_type)
    whole, w_whole = _one_step(tmp_path / "16", tiny_tokenizer, micro_batch_size=16, loss_type=loss_type)
    same = (small["grpo_loss"] == pytest.approx(whole["grpo_loss"], rel=1e-5, abs=1e-7)
            and small["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)
            and all(torch.allclose(w_small[k], w_whole[k], atol=5e-5) for k in w_small))  # lr 1e-3; seen 1.6e-5
    if LOSS_TYPES_TABLE[loss_type].exact:
        assert same, (small["grad_norm"], whole["grad_norm"])
        return
    assert loss_type == "bnpo" and not same and small["grad_norm"] != pytest.approx(whole["grad_norm"], rel=1e-3)
    dapo, _ = _one_step(tmp_path / "dapo", tiny_tokenizer, micro_batch_size=16, loss_type="dapo")
    assert whole["grad_norm"] == pytest.approx(dapo["grad_norm"], rel=1e-5)


def test_loss_weights_add_up_to_one_step():
    table = LOSS_TYPES_TABLE
    assert table["dapo"].weight(2, 2, 16) == 1.0  # each micro-batch already divides by the step's tokens
    for name in ("grpo", "dr_grpo", "bnpo"):  # micro-batches of 4, 4 and 2 of the step's 10 rows
        assert sum(table[name].weight(r, r, 10) for r in (4, 4, 2)) == pytest.approx(1.0)
    # 1 of a micro-batch's 4 rows trained (the others skipped at advantage 0): grpo counts the trained
    # row's share; bnpo's token mean is over the whole micro-batch, so it keeps the micro-batch's share
    assert table["grpo"].weight(1, 4, 10) == 0.1 and table["bnpo"].weight(1, 4, 10) == 0.4


def test_a_step_crosses_the_epoch_boundary_into_the_next_order():
    """10 prompts, 4 a step: step 2 takes the last two of epoch 0's order, then the first two of
    epoch 1's; every prompt comes once per epoch."""
    first, second = _epoch_order(10, 7, 0), _epoch_order(10, 7, 1)
    assert first != second
    steps = [step_prompts(s, 10, 4, seed=7) for s in range(5)]
    assert steps[2][0] == first[8:] + second[:2] and steps[2][1] == pytest.approx(1.2)
    seen = [i for indices, _ in steps for i in indices]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))


def test_training_takes_the_prompts_across_the_epoch_boundary(tmp_path, tiny_tokenizer):
    taken = []
    hook = _varied_rollouts(tiny_tokenizer)
    out = tmp_path / "epochs"
    train_grpo(GRPOConfig(model_name="tiny", dataset="synthetic", grpo_output=str(out), max_samples=6, max_steps=2,
                          prompts_per_step=4, num_generations=4, max_completion_length=32, device="cpu",
                          beta=0.0, show_progress=False, seed=3),
               rollout_hook=lambda step, prompts, answers: taken.append(answers) or hook(step, prompts, answers))
    from data import make_synthetic

    answers = [r["answer"] for r in make_synthetic("train", max_samples=6, seed=3)]
    order0, order1 = _epoch_order(6, 3, 0), _epoch_order(6, 3, 1)
    assert taken == [[answers[i] for i in order0[:4]], [answers[i] for i in order0[4:] + order1[:2]]]
    epochs = [json.loads(x)["epoch"] for x in (out / LOG_NAME).read_text().splitlines()]
    assert epochs == [pytest.approx(4 / 6, abs=1e-4), pytest.approx(8 / 6, abs=1e-4)]


def test_each_phase_time_lands_in_its_own_field(tmp_path, tiny_tokenizer):
    """A rollout that takes 0.3 s shows in generation_time_s and not in other_time_s; a reward function
    that takes 0.2 s shows in reward_time_s, part of other_time_s, and not in generation_time_s."""
    from rewards.functions import numeric

    def slow(completions, answer, **columns):
        time.sleep(0.2)
        return numeric(completions, answer)

    hook = _varied_rollouts(tiny_tokenizer)
    out = tmp_path / "times"
    train_grpo(GRPOConfig(model_name="tiny", dataset="synthetic", grpo_output=str(out), max_steps=1,
                          prompts_per_step=2, num_generations=4, max_completion_length=32, device="cpu",
                          beta=0.04, show_progress=False),
               rollout_hook=lambda *a: time.sleep(0.3) or hook(*a), reward_funcs=[slow])
    line = json.loads((out / LOG_NAME).read_text())
    assert 0.3 <= line["generation_time_s"] < 0.5
    assert 0.2 <= line["reward_time_s"] < 0.3
    parts = line["reward_time_s"] + line["reference_time_s"] + line["optimizer_time_s"]
    assert parts <= line["other_time_s"] < parts + 0.1 and line["backward_time_s"] > 0


def _some_groups_without_signal(tokenizer):
    """Groups 0 and 2 score all the same (no signal), groups 1 and 3 are mixed; lengths vary."""
    def hook(step, prompts, answers):
        rows = []
        for g, answer in enumerate(answers):
            for k in range(4):
                right = (g == 0) or (g % 2 == 1 and k % 2 == 0)
                text = (f"#### {answer}" if right else "#### 0") + " and more" * (2 * k + g)
                rows.append(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        return rows
    return hook


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_skipping_zero_advantage_rows_leaves_the_update_exactly_as_it_was(tmp_path, tiny_tokenizer, loss_type):
    """With --beta 0, rows of all-equal groups have advantage 0 and exactly no gradient: skipping their
    forward and backward gives the same loss, gradient norm and weights, every loss type, while half the
    rows never go through the model."""
    from safetensors.torch import load_file

    runs = {}
    for skip in (True, False):
        out = tmp_path / f"skip{skip}"
        train_grpo(GRPOConfig(model_name="tiny", dataset="synthetic", grpo_output=str(out), max_steps=1,
                              prompts_per_step=4, num_generations=4, micro_batch_size=4, max_completion_length=64,
                              device="cpu", learning_rate=1e-3, beta=0.0, show_progress=False, seed=3,
                              loss_type=loss_type, skip_zero_advantage=skip),
                   rollout_hook=_some_groups_without_signal(tiny_tokenizer))
        runs[skip] = json.loads((out / LOG_NAME).read_text()), load_file(str(out / "model.safetensors"))
    (on, w_on), (off, w_off) = runs[True], runs[False]
    assert on["frac_reward_zero_std"] == 0.5 and on["backward_rows"] == 8 and off["backward_rows"] == 16
    assert on["grpo_loss"] == pytest.approx(off["grpo_loss"], rel=1e-5, abs=1e-7)
    assert on["grad_norm"] == pytest.approx(off["grad_norm"], rel=1e-5)
    assert all(torch.allclose(w_on[k], w_off[k], atol=5e-5) for k in w_on)


def test_off_a_terminal_progress_is_a_line_every_tenth_of_the_run(tmp_path, tiny_tokenizer, capsys):
    train_grpo(GRPOConfig(model_name="tiny", dataset="synthetic", grpo_output=str(tmp_path / "p"), max_steps=3,
                          prompts_per_step=2, num_generations=4, max_completion_length=16, device="cpu", beta=0.0,
                          eval_every=3, eval_samples=2, show_progress=True),
               rollout_hook=_varied_rollouts(tiny_tokenizer))
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("grpo step")]
    assert [x.split(":")[0] for x in lines] == ["grpo step 1/3", "grpo step 2/3", "grpo step 3/3"]
    assert "reward " in lines[0] and "zero_signal " in lines[0] and "eval_accuracy " in lines[-1]


def test_with_signal_first_keeps_groups_with_a_signal_then_fills_in_order():
    from grpo.groups import with_signal_first

    rewards = torch.tensor([1., 1., 0., 1., 0., 0., 1., 0., 2., 2.])  # groups of 2: equal, varied, equal, varied, equal
    assert with_signal_first(rewards, 2, 2) == [1, 3]
    assert with_signal_first(rewards, 2, 4) == [1, 3, 0, 2]


def _signal_when(tokenizer, calls, mod):
    """A group has a signal (right and wrong answers) when its answer is a multiple of `mod`, else every
    sample is right."""
    def hook(step, prompts, answers):
        calls.append(list(answers))
        rows = []
        for answer in answers:
            for k in range(4):
                right = int(float(answer)) % mod != 0 or k % 2 == 0
                text = (f"#### {answer}" if right else "#### 0") + " and more" * k
                rows.append(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        return rows
    return hook


@pytest.mark.parametrize("cap,mod", [(8, 2), (1, 7)])
def test_dynamic_sampling_rolls_out_more_prompts_until_every_group_has_a_signal(tmp_path, tiny_tokenizer, cap, mod):
    """Further rollouts until the step holds prompts_per_step groups with a signal (all of them trained,
    none all-equal), logged as extra_rollouts; with a cap of 1 (and signals rare) the step stops there
    and groups without a signal fill what is missing."""
    calls = []
    out = tmp_path / f"dyn{cap}"
    train_grpo(GRPOConfig(model_name="tiny", dataset="synthetic", grpo_output=str(out), max_steps=2,
                          prompts_per_step=4, num_generations=4, max_completion_length=64, device="cpu", beta=0.0,
                          show_progress=False, seed=3, dynamic_sampling=True, max_extra_rollouts=cap),
               rollout_hook=_signal_when(tiny_tokenizer, calls, mod))
    lines = [json.loads(x) for x in (out / LOG_NAME).read_text().splitlines()]
    assert len(calls) == sum(1 + line["extra_rollouts"] for line in lines)
    for line, first in zip(lines, [0, 1 + lines[0]["extra_rollouts"]]):
        step_calls = calls[first: first + 1 + line["extra_rollouts"]]
        signal = [sum(int(float(a)) % mod == 0 for a in answers) for answers in step_calls]
        assert line["prompts_sampled"] == 4 * len(step_calls)
        assert sum(signal) >= 4 or line["extra_rollouts"] == cap  # stopped only with enough, or at the cap
        assert sum(signal[:-1]) < 4  # not one rollout more than needed
        assert line["frac_reward_zero_std"] == pytest.approx(max(0, 4 - sum(signal)) / 4)
        assert line["backward_rows"] == 4 * min(4, sum(signal))
    assert cap == 1 or all(line["frac_reward_zero_std"] == 0 for line in lines)
    assert cap == 8 or any(line["frac_reward_zero_std"] > 0 for line in lines)


def _some_rows_cut(tokenizer):
    """Per group of 4: a right answer that finished, a wrong one that finished, a right one cut at the
    limit (no end-of-turn) and a wrong one cut; lengths differ, so every normalizer shows."""
    def hook(step, prompts, answers):
        rows = []
        for g, answer in enumerate(answers):
            for k, (right, finished) in enumerate([(True, True), (False, True), (True, False), (False, False)]):
                text = (f"#### {answer}" if right else "#### 0") + " and more" * (k + g)
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                rows.append(ids + [tokenizer.eos_token_id] if finished else ids)
        return rows
    return hook


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_masked_truncated_rows_leave_the_loss_but_keep_their_rewards(tmp_path, tiny_tokenizer, loss_type):
    """--mask_truncated_completions, checked against the loss computed by hand. With beta 0 and one update
    the ratio is 1, so each token's loss is -A: dapo (and bnpo in one micro-batch) -sum A_i n_i / sum n_i,
    grpo -sum A_i / rows, dr_grpo -sum A_i n_i / (rows x max length), each over the finished rows only,
    while A_i comes from the rewards of all four rows of the group (the cut ones included)."""
    from grpo.loss import group_advantages

    seen = []
    L = 64

    def recorded(tokenizer):
        hook = _some_rows_cut(tokenizer)
        return lambda *a: seen.append(hook(*a)) or seen[-1]

    log, _ = _one_step(tmp_path / "mask", tiny_tokenizer, recorded, beta=0.0, loss_type=loss_type, micro_batch_size=16,
                       mask_truncated_completions=True, max_completion_length=L)
    rows = seen[0]
    finished = torch.tensor([tiny_tokenizer.eos_token_id in r for r in rows])
    n = torch.tensor([float(len(r)) for r in rows])
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0] * 4)  # right / wrong, cut or not: the numeric reward
    A = group_advantages(rewards, 4)
    A, n = A[finished], n[finished]
    expected = {"dapo": -(A * n).sum() / n.sum(), "bnpo": -(A * n).sum() / n.sum(),
                "grpo": -A.sum() / len(A), "dr_grpo": -(A * n).sum() / (len(A) * L)}[loss_type]
    assert log["masked_rows"] == 8 and log["reward_mean"] == pytest.approx(0.5)
    assert log["grpo_loss"] == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert log["backward_rows"] == 8  # the cut rows skip the forward and backward
    if loss_type != "bnpo":  # micro-batches of 2 add up to the same update
        small, _ = _one_step(tmp_path / "mask2", tiny_tokenizer, _some_rows_cut, beta=0.0, loss_type=loss_type,
                             micro_batch_size=2, mask_truncated_completions=True, max_completion_length=L)
        assert small["grpo_loss"] == pytest.approx(log["grpo_loss"], rel=1e-5, abs=1e-7)
        assert small["grad_norm"] == pytest.approx(log["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("beta,mask_truncated", [(0.04, False), (0.0, True)])
def test_at_most_one_device_read_per_micro_batch(tmp_path, tiny_tokenizer, monkeypatch, beta, mask_truncated):
    """Each read of a device value on the host (.item(), .tolist(), a nonzero's size) makes the host wait
    for every queued kernel. Counted with a dispatch mode over the step's backward phase: one read per
    micro-batch (its figures, after its backward is queued), with the KL term or with rows skipped
    and masked out, and the projected loss's backward reads nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import grpo.step as grpo_step
    from common.timing import Timer

    reads = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default",
             "aten.equal.default"}

    class Count(TorchDispatchMode):
        on, seen = False, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if self.on and str(func) in reads:
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    counter, real_phase, real_backward, micro_batches = Count(), Timer.__call__, grpo_step.micro_batch_backward, []

    def phase(timer, name):
        inner = real_phase(timer, name)

        class Counted:
            def __enter__(self):
                counter.on = name == "backward"
                inner.__enter__()

            def __exit__(self, *exc):
                inner.__exit__(*exc)
                counter.on = False

        return Counted()

    def backward(*args, **kwargs):
        micro_batches.append(1)
        return real_backward(*args, **kwargs)

    monkeypatch.setattr(Timer, "__call__", phase)
    monkeypatch.setattr(grpo_step, "micro_batch_backward", backward)
    with counter:
        log, _ = _one_step(tmp_path, tiny_tokenizer, micro_batch_size=4, beta=beta,
                           mask_truncated_completions=mask_truncated)
    assert micro_batches and log["backward_rows"] > 0
    assert counter.seen == ["aten._local_scalar_dense.default"] * len(micro_batches), counter.seen


def test_no_grad_passes_take_wider_micro_batches_on_cuda_and_give_the_same_logprobs(tiny_model, tiny_tokenizer):
    """The reference/old log-prob passes keep no activations: 4x the training micro-batch on CUDA (the
    CPU keeps its own), or --no_grad_micro_batch_size; any width gives the same log-probs."""
    import contextlib

    from grpo.batch import pack
    from grpo.step import logprobs_no_grad, no_grad_micro_batch

    cfg = GRPOConfig(micro_batch_size=4)
    assert (no_grad_micro_batch(cfg, "cuda"), no_grad_micro_batch(cfg, "cpu")) == (16, 4)
    assert no_grad_micro_batch(GRPOConfig(micro_batch_size=4, no_grad_micro_batch_size=6), "cuda") == 6
    prompts = [tiny_tokenizer(f"q{i}?")["input_ids"] for i in range(3) for _ in range(4)]
    completions = [[5 + i, 6, 7][: 1 + i % 3] for i in range(12)]
    batch = pack(prompts, completions, tiny_tokenizer.pad_token_id, "cpu")
    narrow, wide = (logprobs_no_grad(tiny_model, batch, m, 0.7, contextlib.nullcontext) for m in (4, 12))
    assert torch.allclose(narrow, wide, atol=1e-5)


def _sampled_step(out, monkeypatch=None, shift=None, **overrides):
    """One step of the tiny fp32 model on its own samples (no hook: the engine's log-probs reach the
    loss), rewards by length so every group carries a signal; `shift` (row, amount) lowers that row's
    sampler log-probs by `amount` per token. Returns (log line, weights, the rows' lengths)."""
    from safetensors.torch import load_file

    from sampling import Sampler

    seen = []

    def sample(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        seen.append([len(c) for c in out.token_ids])
        if shift is not None:
            row, amount = shift
            out.logprobs[row] = [lp - amount for lp in out.logprobs[row]]
        return out

    real = Sampler.sample
    if monkeypatch is not None:
        monkeypatch.setattr(Sampler, "sample", sample)
    cfg = dict(model_name="tiny", dataset="synthetic", grpo_output=str(out), max_steps=1, prompts_per_step=2,
               num_generations=4, max_completion_length=8, device="cpu", learning_rate=1e-3, beta=0.0,
               show_progress=False, seed=3, save_every=10, micro_batch_size=8, max_samples=8)
    train_grpo(GRPOConfig(**{**cfg, **overrides}),
               reward_funcs=[lambda completions, **kw: [-len(c) / 10 for c in completions]])
    return json.loads((out / LOG_NAME).read_text()), load_file(str(out / "model.safetensors")), seen[:1]


def test_the_engine_s_log_probs_reach_the_loss_and_match_the_training_forward(tmp_path, monkeypatch):
    """On the fp32 tiny model the sampler's log-probs equal the training forward's (sampler_kl < 1e-6,
    diff < 1e-4), so a correction leaves the step as it was: loss and gradient norm within 1e-6
    (relative). The weights after Adam's first step are not compared: lr x g / (|g| + eps) turns a 1e-7
    change in a near-zero gradient entry into a visible one."""
    base, _, _ = _sampled_step(tmp_path / "none", monkeypatch)
    assert base["sampler_kl"] < 1e-6 and base["sampler_logp_diff_max"] < 1e-4
    assert base["sampler_ratio_min"] <= base["sampler_ratio_mean"] <= base["sampler_ratio_max"]
    assert base["grad_norm"] > 0
    on, _, _ = _sampled_step(tmp_path / "on", monkeypatch, rollout_correction="sequence_mask")
    assert on["grpo_loss"] == pytest.approx(base["grpo_loss"], abs=1e-6)
    assert on["grad_norm"] == pytest.approx(base["grad_norm"], rel=1e-6)
    assert on["rollout_correction_masked_tokens"] == 0


@pytest.mark.parametrize("mode", ["token_truncate", pytest.param("token_mask", marks=pytest.mark.slow),
                                  pytest.param("sequence_truncate", marks=pytest.mark.slow), "sequence_mask"])
def test_a_row_the_sampler_drew_off_policy_is_counted_as_the_mode_says(tmp_path, monkeypatch, mode):
    """A row whose sampler log-probs are lowered by log 3 per token (ratio 3 > cap 2, per token and per
    completion) has every token truncated or masked (loss values by hand: tests/test_grpo_loss.py), the
    same in micro-batches of 2 as in one of 8 (loss and gradient norm; the weights after Adam's first
    step amplify rounding, see above)."""
    shifted, _, lengths = _sampled_step(tmp_path / "shifted", monkeypatch, (5, math.log(3)),
                                                rollout_correction=mode, micro_batch_size=2)
    n = lengths[0][5]
    assert shifted["sampler_logp_diff_max"] == pytest.approx(math.log(3), rel=1e-5)
    assert shifted["sampler_ratio_max"] == pytest.approx(3.0, rel=1e-5)
    truncate = mode.endswith("truncate")
    assert shifted["rollout_correction_truncated_tokens"] == (n if truncate else 0)
    assert shifted["rollout_correction_masked_tokens"] == (0 if truncate else n)
    assert shifted["rollout_correction_masked_rows"] == (0 if truncate else 1)
    if mode == "sequence_mask":
        whole, _, _ = _sampled_step(tmp_path / "whole", monkeypatch, (5, math.log(3)), rollout_correction=mode)
        assert whole["grad_norm"] == pytest.approx(shifted["grad_norm"], rel=1e-5)
        assert whole["grpo_loss"] == pytest.approx(shifted["grpo_loss"], rel=1e-5, abs=1e-7)
