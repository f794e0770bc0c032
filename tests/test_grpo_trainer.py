import json
import math
import re
import subprocess
import sys

import pytest
import torch

import grpo.step as grpo_step
from common.errors import UserError
from common.run_files import JsonlLog
from grpo.batch import pack
from grpo.loss import Counts
from grpo.step import reference_logprobs
from grpo.trainer import LOG_NAME, GRPOConfig, train_grpo
from models.tiny import tiny_dir
from tests.conftest import ROOT, give_lora_b_weights

LOGGED_FIELDS = [
    "timestamp_iso", "step", "epoch", "device", "seed", "grpo_loss", "policy_loss", "kl_loss", "reward_mean",
    "reward_std", "adv_mean", "adv_std", "grad_norm", "learning_rate", "time_per_step_s", "generation_time_s",
    "backward_time_s", "other_time_s", "tokens_generated", "kl", "entropy", "clip_ratio_low", "clip_ratio_high",
    "clip_ratio_region", "completion_len_mean", "completion_len_min", "completion_len_max", "clipped_ratio",
    "frac_reward_zero_std", "peak_memory_gb",
]


def quick(out, **overrides) -> GRPOConfig:
    base = dict(model_name="tiny", dataset="synthetic", grpo_output=str(out), max_steps=1, prompts_per_step=2,
                num_generations=4, micro_batch_size=4, max_completion_length=12, temperature=1.0, device="cpu",
                learning_rate=1e-3, eval_samples=4, show_progress=False, seed=5)
    base.update(overrides)
    return GRPOConfig(**base)


def read_log(out):
    return [json.loads(x) for x in (out / LOG_NAME).read_text().splitlines()]


def test_one_step_end_to_end_logs_every_field(tmp_path):
    out = tmp_path / "run"
    train_grpo(quick(out, beta=0.04, eval_every=1))
    baseline, line = read_log(out)
    assert baseline["step"] == 0 and "eval_accuracy" in baseline and "grpo_loss" not in baseline
    for key in LOGGED_FIELDS + ["eval_accuracy"]:
        assert key in line, key
        value = line[key]
        assert value is not None and (not isinstance(value, float) or math.isfinite(value)), key
    assert line["step"] == 1 and line["device"] == "cpu" and line["seed"] == 5
    assert line["grpo_loss"] == pytest.approx(line["policy_loss"] + line["kl_loss"], abs=1e-6)
    # other_time_s is the remainder by definition; tests/test_grpo_step.py checks each phase lands in its field
    assert line["tokens_generated"] == pytest.approx(line["completion_len_mean"] * 8)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoModelForCausalLM.from_pretrained(out) is not None and AutoTokenizer.from_pretrained(out) is not None
    assert (out / "checkpoint" / "trainer_state.json").is_file()


def _fixed_rollouts(tokenizer):
    """Deterministic completions: half the group right and stopped, half wrong, per prompt."""
    def hook(step, prompts, answers):
        rows = []
        for answer in answers:
            for k in range(4):
                text = f"#### {answer}" if k % 2 == 0 else "#### 0 and more words"
                rows.append(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        return rows
    return hook


def test_on_policy_ratio_is_one_and_beta_zero_skips_reference(tmp_path, monkeypatch, tiny_tokenizer):
    calls = []
    real = grpo_step.logprobs_no_grad
    monkeypatch.setattr(grpo_step, "logprobs_no_grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    import models

    copies = []
    real_copy = models.frozen_copy
    monkeypatch.setattr(models, "frozen_copy", lambda *a: copies.append(1) or real_copy(*a))
    out = tmp_path / "beta0"
    train_grpo(quick(out, beta=0.0, max_steps=3, learning_rate=0.05), rollout_hook=_fixed_rollouts(tiny_tokenizer))
    lines = read_log(out)
    assert not calls and not copies  # no reference model, no reference pass, no old-logprob pass
    for line in lines:
        assert line["clip_ratio_low"] == line["clip_ratio_high"] == line["clip_ratio_region"] == 0.0
        assert line["kl"] == 0.0 and line["kl_loss"] == 0.0
    assert lines[0]["reward_mean"] == 0.5 and lines[0]["frac_reward_zero_std"] == 0.0

    train_grpo(quick(tmp_path / "beta", beta=0.1, max_steps=2, learning_rate=0.05),
               rollout_hook=_fixed_rollouts(tiny_tokenizer))
    assert len(calls) == 2 and len(copies) == 1  # one frozen copy, one reference pass per step
    assert read_log(tmp_path / "beta")[1]["kl"] > 0  # the policy moved away from the reference


def test_steps_under_the_cuda_compute_policy_on_the_cpu(tmp_path, monkeypatch, tiny_tokenizer):
    """CUDA's policy on the CPU: bf16 autocast over fp32 weights, the decode step in bf16 (the evals'
    rollouts). Every logged value is finite, the policy equals the reference at step 1 (kl 0), and the
    update moves it away (kl > 0 at step 2)."""
    import models
    import sampling.engine as engine

    autocasts = []
    monkeypatch.setattr(models, "autocast",
                        lambda device: autocasts.append(1) or torch.autocast("cpu", dtype=torch.bfloat16))
    monkeypatch.setattr(engine, "decode_dtype", lambda model, device: torch.bfloat16)
    out = tmp_path / "bf16"
    train_grpo(quick(out, beta=0.1, max_steps=2, learning_rate=0.05, eval_every=1),
               rollout_hook=_fixed_rollouts(tiny_tokenizer))
    baseline, *lines = read_log(out)
    assert autocasts and 0 <= baseline["eval_accuracy"] <= 1
    for line in lines:
        for key in LOGGED_FIELDS:
            assert not isinstance(line[key], float) or math.isfinite(line[key]), key
    assert lines[0]["kl"] == 0.0 and lines[1]["kl"] > 0 and lines[0]["grad_norm"] > 0


def test_num_iterations_reuses_the_rollout_with_old_logprobs(tmp_path, tiny_tokenizer):
    out = tmp_path / "mu"
    train_grpo(quick(out, beta=0.0, max_steps=2, num_iterations=3, learning_rate=0.05),
               rollout_hook=_fixed_rollouts(tiny_tokenizer))
    lines = read_log(out)
    assert max(x["clip_ratio_region"] for x in lines) > 0  # later iterations are off-policy and get clipped


def test_lora_reference_is_the_base_model(tiny_tokenizer):
    from models import load_model
    from models.lora import add_lora

    base = load_model("tiny", device="cpu", tokenizer=tiny_tokenizer)
    peft_model = add_lora(load_model("tiny", device="cpu", tokenizer=tiny_tokenizer), r=4, alpha=8, dropout=0.0)
    give_lora_b_weights(peft_model, 0.5)  # an adapter that changes the outputs
    prompts = [tiny_tokenizer("q1?")["input_ids"], tiny_tokenizer("a longer question?")["input_ids"]]
    batch = pack(prompts, [[5, 6, 7], [8, 9]], tiny_tokenizer.pad_token_id, "cpu")
    no_autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    ref = reference_logprobs(peft_model, None, batch, 1, 0.7, no_autocast)
    want = reference_logprobs(None, base, batch, 2, 0.7, no_autocast)
    policy = grpo_step.logprobs_no_grad(peft_model, batch, 2, 0.7, no_autocast)
    mask = batch.completion_mask.bool()
    assert torch.allclose(ref[mask], want[mask], atol=1e-5)
    assert not torch.allclose(policy[mask], want[mask], atol=1e-3)


def test_lora_run_saves_merged_model(tmp_path):
    out = tmp_path / "lora"
    train_grpo(quick(out, finetune="lora", beta=0.04, max_steps=2))
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "config.json").is_file()
    assert len(read_log(out)) == 2


def test_qlora_steps_are_the_same_with_or_without_evals(tmp_path, tiny_tokenizer):
    """4-bit base + LoRA on the CPU: held-out evals (eval mode, no grad) between steps leave the training
    steps exactly as they are without them."""
    logs = []
    for every in (0, 1):
        out = tmp_path / f"qlora{every}"
        train_grpo(quick(out, finetune="lora", use_4bit=True, max_steps=3, eval_every=every, eval_samples=2,
                         eval_max_new_tokens=4, beta=0.0, learning_rate=0.05),
                   rollout_hook=_fixed_rollouts(tiny_tokenizer))
        logs.append(read_log(out))
    assert sum("eval_accuracy" in x for x in logs[1]) == 4 and not any("eval_accuracy" in x for x in logs[0])
    steps = [[x["grad_norm"] for x in log if x["step"] > 0] for log in logs]
    assert steps[1] == steps[0] and len(steps[0]) == 3 and all(g > 0 for g in steps[0])


def _random_rollouts(tokenizer):
    """Right or wrong answers drawn from torch's global RNG, so resuming must restore it."""
    def hook(step, prompts, answers):
        rows = []
        for answer in answers:
            for _ in range(4):
                text = f"#### {answer}" if torch.rand(()) < 0.5 else f"#### {int(torch.randint(0, 99, ()))} x"
                rows.append(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        return rows
    return hook


def test_resume_gives_the_same_weights(tmp_path, monkeypatch, tiny_tokenizer):
    from safetensors.torch import load_file

    common = dict(max_steps=4, save_every=2, beta=0.04, learning_rate=5e-3)
    hook = _random_rollouts(tiny_tokenizer)
    train_grpo(quick(tmp_path / "straight", **common), rollout_hook=hook)
    real_write = JsonlLog.write

    def crash_at_step_4(self, record):
        if record["step"] == 4:
            raise KeyboardInterrupt
        real_write(self, record)

    monkeypatch.setattr(JsonlLog, "write", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_grpo(quick(tmp_path / "resumed", **common), rollout_hook=hook)
    monkeypatch.setattr(JsonlLog, "write", real_write)
    train_grpo(quick(tmp_path / "resumed", resume=True, **common), rollout_hook=hook)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert [x["step"] for x in read_log(tmp_path / "resumed")] == [1, 2, 3, 4]
    base = load_file(str(tiny_dir() / "model.safetensors"))
    assert any(not torch.allclose(a[k], base[k]) for k in a if k in base)  # it trained


def test_non_finite_loss_skips_and_stops_after_three(tmp_path, monkeypatch):
    real = grpo_step.grpo_loss

    def nan_loss(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return loss * float("nan"), {**metrics, "grpo_loss": metrics["grpo_loss"] * float("nan")}

    monkeypatch.setattr(grpo_step, "grpo_loss", nan_loss)
    out = tmp_path / "nan"
    with pytest.raises(UserError, match="3 steps in a row") as info:
        train_grpo(quick(out, max_steps=10, save_every=1))
    assert "checkpoint" in str(info.value)
    lines = read_log(out)
    assert len(lines) == 3 and all(x["skipped_updates"] == 1 and x["grpo_loss"] is None for x in lines)
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 2


def test_warns_once_when_completions_are_cut(tmp_path, capsys):
    train_grpo(quick(tmp_path / "cut", max_steps=11, max_completion_length=3, learning_rate=0.0))
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert text.count("warning:") == 1 and "run SFT first" in text and "--max_completion_length" in text


def test_config_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="add --finetune lora"):
        train_grpo(quick(tmp_path / "a", use_4bit=True))
    with pytest.raises(UserError, match="run train_sft.py first"):
        train_grpo(quick(tmp_path / "b", model_name=None, sft_output=str(tmp_path / "missing")))
    with pytest.raises(UserError, match="--num_generations must be >= 2 \\(got 1\\)"):
        train_grpo(quick(tmp_path / "c", num_generations=1))
    with pytest.raises(UserError, match="--cuda_graphs on needs a CUDA device, not cpu"):
        train_grpo(quick(tmp_path / "d", cuda_graphs="on"))
    assert not (tmp_path / "d").exists()  # refused before anything is written
    result = subprocess.run([sys.executable, "train_grpo.py", "--sft_output", str(tmp_path / "none"),
                             "--grpo_output", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith("error:")


def test_help_explains_flags():
    result = subprocess.run([sys.executable, "train_grpo.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0
    for flag in ("--sft_output", "--grpo_output", "--model_name", "--data_dir", "--dataset", "--max_samples",
                 "--max_steps", "--num_epochs", "--temperature", "--top_p", "--max_completion_length", "--beta",
                 "--epsilon", "--num_generations", "--learning_rate", "--loss_type", "--scale_rewards", "--seed",
                 "--save_every", "--eval_every", "--resume", "--num_iterations", "--finetune", "--use_4bit",
                 "--cuda_graphs"):
        assert flag in result.stdout, flag


@pytest.mark.slow
def test_grpo_learns_a_new_kind_of_problem_from_final_answers(sft_tiny, tmp_path):
    """The most important test: from the shared SFT (worked solutions of six kinds), 40 GRPO steps on final
    answers of a mix that is half a seventh, new kind raise greedy accuracy on 300 held-out problems of
    the new kind, decisively by a paired test.

    Measured over seeds 0-3 (SFT and GRPO seeded alike, one thread; the demo's scenario, shorter), new
    kind at step 0 -> 40 (fixed/broken problems, McNemar p): 0.043 -> 0.340 (94/5, 2e-22), 0.000 ->
    0.133 (40/0, 2e-12), 0.103 -> 0.560 (139/2, 7e-39), 0.053 -> 0.230 (55/2, 2e-14): gains +0.13 to
    +0.46. The test asks for a gain of at least 0.05 and p < 1e-4, far below the weakest seed: a broken
    update fails it, a machine whose BLAS takes another trajectory (as another seed does) does not."""
    from eval.compare import mcnemar_p
    from eval.evaluate import evaluate
    from models import load_model_and_tokenizer
    from sampling import Sampler, SamplingParams
    from tests.conftest import NEW_KIND, SEEN_KINDS

    out = tmp_path / "learn"
    cfg = GRPOConfig(model_name=str(sft_tiny[0]), dataset=SEEN_KINDS + ",times_more" * 6, eval_dataset=NEW_KIND,
                     grpo_output=str(out), max_steps=40, prompts_per_step=32, num_generations=8, micro_batch_size=128,
                     max_completion_length=48, temperature=1.0, beta=0.0, learning_rate=1e-4, eval_every=40,
                     eval_samples=300, device="cpu", show_progress=False, seed=0)
    train_grpo(cfg)
    log = read_log(out)
    assert log[0]["step"] == 0 and log[-1]["step"] == 40
    from data import load_records

    held_out = load_records(NEW_KIND, "test", max_samples=300, seed=cfg.seed)
    correct = []
    for model_dir in (sft_tiny[0], out):
        model, tokenizer = load_model_and_tokenizer(str(model_dir), device="cpu")
        sampler = Sampler(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          batch_size=128, continuous=True)
        _, predictions = evaluate(sampler, tokenizer, held_out, SamplingParams(max_new_tokens=48), show_progress=False)
        correct.append([p["correct"] for p in predictions])
    before, after = (sum(c) / len(c) for c in correct)
    fixed = sum(not a and b for a, b in zip(*correct))
    broken = sum(a and not b for a, b in zip(*correct))
    p = mcnemar_p(fixed, broken)
    print(f"new kind, greedy: {before:.3f} -> {after:.3f} ({fixed} fixed, {broken} broken, McNemar p {p:.1e})")
    assert after - before >= 0.05 and p < 1e-4, (before, after, fixed, broken, p)


def test_training_logits_are_freed_before_the_model_backward(tiny_model, tiny_tokenizer, monkeypatch):
    """Where the loss cannot project the hidden states itself (a LoRA or quantized head, DDP), the
    [rows, C, V] logits of a micro-batch are needed only by the log-prob pass's backward: by the time
    gradients reach the first layer they must be gone (Qwen3-0.6B: 0.6 GB at 4 x 512 tokens)."""
    import weakref

    import grpo.batch as gb

    made, freed = [], []
    real = gb._completion_forward

    def recorded(model, batch, share, hidden):
        assert not hidden
        logits = real(model, batch, share, hidden)
        made.append(weakref.ref(logits))
        return logits

    monkeypatch.setattr(gb, "head_weight", lambda model: None)  # the logits path
    monkeypatch.setattr(gb, "_completion_forward", recorded)
    tiny_model.model.layers[0].self_attn.q_proj.weight.register_hook(
        lambda grad: freed.append(made[-1]() is None))
    prompts = [tiny_tokenizer("q1?")["input_ids"], tiny_tokenizer("a longer question?")["input_ids"]]
    mb = pack(prompts, [[5, 6, 7], [8, 9]], tiny_tokenizer.pad_token_id, "cpu")
    cfg = quick("unused", beta=0.0)
    metrics, entropy = grpo_step.micro_batch_backward(
        tiny_model, mb, None, None, torch.tensor([1.0, -1.0]), cfg, counts=Counts(step_tokens=5.0), scale=1.0,
        sync=True, autocast=lambda: torch.autocast("cpu", enabled=False))
    assert made and freed == [True] and entropy > 0 and math.isfinite(metrics["grpo_loss"])


def test_print_completions_shows_k_completions_with_their_rewards_each_step(tmp_path, capsys):
    """--print_completions 3: three completions a step in the console, each with every reward, their sum
    and its advantage; nothing written to completions.jsonl unless --log_completions asks."""
    train_grpo(quick(tmp_path / "p", max_steps=2, print_completions=3, reward=("numeric", "format")))
    lines = capsys.readouterr().out.splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith("completions at step ")]
    assert [lines[i] for i in heads] == ["completions at step 1 (3):", "completions at step 2 (3):"]
    shown = [line for line in lines[heads[0] + 1: heads[0] + 7] if line.startswith("  reward ")]
    assert len(shown) == 3 and all(re.match(r"  reward -?\d\.\d{3} \(numeric \d\.\d{3}, format \d\.\d{3}\), "
                                            r"advantage [+-]\d\.\d{3}", s) for s in shown)
    assert not (tmp_path / "p" / "completions.jsonl").exists()


def test_entropy_controls_train_and_log(tmp_path):
    """--top_entropy_quantile 0.2 and --entropy_coef 0.01 run a step; the bonus is logged as entropy_loss
    (negative: it lowers the loss) and grpo_loss adds it to the policy and KL terms."""
    train_grpo(quick(tmp_path / "e", top_entropy_quantile=0.2, entropy_coef=0.01, beta=0.04))
    (line,) = read_log(tmp_path / "e")
    assert line["entropy_loss"] < 0
    assert line["grpo_loss"] == pytest.approx(line["policy_loss"] + line["kl_loss"] + line["entropy_loss"], abs=1e-6)
