import json
import os
import re
import subprocess

import pytest

from tests.conftest import ROOT, gsm8k_dir, needs_gsm8k
from viz.plots import PLOTS


@pytest.mark.slow  # ~50 s: ten stages, each its own process
def test_offline_preset_smoke_runs_every_stage(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OUT": str(out)}
    result = subprocess.run(["bash", "run_training.sh", "--tiny", "--smoke"], cwd=ROOT, capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in ("reward-selftest", "sft", "grpo", "eval-sft", "eval-grpo", "plots"):
        assert f"== [{stage}] done" in result.stdout, stage
    assert "held-out accuracy after SFT" in result.stdout
    for model in ("sft", "grpo"):
        assert (out / model / "config.json").is_file() and (out / model / "tokenizer.json").is_file()
        assert json.loads((out / "eval" / model / "eval_summary.json").read_text())["num_questions"] == 8
    log = [json.loads(x) for x in (out / "grpo" / "grpo_training_logs.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [0, 1, 2]  # the step-0 line holds the baseline eval
    assert all((out / "plots" / name).stat().st_size > 0 for name in PLOTS)


@pytest.mark.slow  # ~8 minutes on 2 cores: the real recipe's stages at Qwen3-0.6B's full shape
@needs_gsm8k
def test_rehearsal_runs_the_real_recipe_at_full_shape_offline_and_leaves_every_file(tmp_path):
    """./run_training.sh --rehearse: the real recipe's stages, flags and GSM8K files on a Qwen3-0.6B-shaped
    folder loaded by from_pretrained, with HF_HUB_OFFLINE unset (nothing may need the network)."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(OUT=str(out), GSM8K_DIR=gsm8k_dir())
    result = subprocess.run(["bash", "run_training.sh", "--rehearse"], cwd=ROOT, capture_output=True, text=True,
                            env=env, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in ("reward-selftest", "base", "sft", "grpo", "eval-sft", "eval-grpo", "plots"):
        assert f"== [{stage}] done" in result.stdout, stage
    shape = json.loads((out / "base" / "config.json").read_text())
    assert (shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]) == (1024, 28, 151936)
    # the real recipe's settings where --help names no difference
    sft = json.loads((out / "sft" / "run_config.json").read_text())
    grpo = json.loads((out / "grpo" / "run_config.json").read_text())
    assert (sft["finetune"], sft["dataset"], sft["model_name"]) == ("lora", "gsm8k", str(out / "base"))
    assert (grpo["finetune"], grpo["beta"], grpo["micro_batch_size"], grpo["loss_type"]) == ("full", 0.01, 4, "dapo")
    # every file the real run leaves: each model loadable, its adapter, checkpoint, logs, evals and plots
    for model in ("sft", "grpo"):
        for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "run_config.json",
                     "checkpoint/trainer_state.json", "eval/eval_summary.json"):
            assert (out / model / name).is_file(), f"{model}/{name}"
        assert json.loads((out / "eval" / model / "eval_summary.json").read_text())["num_questions"] == 8
    assert (out / "sft" / "adapter" / "adapter_config.json").is_file()
    log = [json.loads(x) for x in (out / "grpo" / "grpo_training_logs.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [0, 1, 2] and (out / "grpo" / "eval" / "step_2" / "eval_summary.json").is_file()
    assert all((out / "plots" / name).stat().st_size > 0 for name in PLOTS)


def test_failing_stage_is_named(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "run"), "GSM8K_DIR": str(tmp_path / "nowhere")}
    result = subprocess.run(["bash", "run_training.sh"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 1
    assert "error: stage 'sft' failed" in result.stderr and "--data_dir" in result.stderr
    assert "== [grpo]" not in result.stdout  # fails fast
    result = subprocess.run(["bash", "run_training.sh", "--bogus"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "unknown argument" in result.stderr
    result = subprocess.run(["bash", "run_training.sh", "--tiny"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "SEED": "1.5"})
    assert result.returncode == 2 and result.stderr == "error: SEED must be a whole number >= 0 (got '1.5')\n"


def test_seed_interface_dispatches(tmp_path):
    """train.py --mode sft|grpo|eval runs each stage (in this process: the stages' own CLIs run as
    processes elsewhere); --mode both asks for the stages one at a time."""
    import train
    from common.errors import UserError

    sft, grpo = tmp_path / "sft", tmp_path / "grpo"
    base = ["--sft_output", str(sft), "--grpo_output", str(grpo), "--dataset", "synthetic", "--max_samples", "16",
            "--batch_size", "8"]
    train.main(base + ["--mode", "sft", "--model_name", "tiny", "--max_steps", "1", "--eval_samples", "2",
                       "--eval_max_new_tokens", "4", "--no_progress"])
    train.main(base + ["--mode", "grpo", "--max_steps", "1", "--max_completion_length", "8", "--no_progress"])
    assert json.loads((grpo / "run_config.json").read_text())["start_model"] == str(sft)
    train.main(base + ["--mode", "eval", "--max_new_tokens", "4", "--no_progress"])
    assert (grpo / "eval" / "eval_summary.json").is_file()
    with pytest.raises(UserError, match="separately"):
        train.main(base + ["--mode", "both", "--beta", "0"])


@pytest.mark.parametrize("argv,sft,grpo", [
    (["--mode", "both", "--max_steps", "5"], ["--max_steps", "5"], ["--max_steps", "5"]),
    (["--mode", "both", "--sft_max_steps", "3", "--grpo_max_steps", "7"], ["--max_steps", "3"], ["--max_steps", "7"]),
    (["--mode", "both", "--max_steps", "5", "--grpo_max_steps", "2", "--seed", "1"],
     ["--max_steps", "5", "--seed", "1"], ["--max_steps", "2", "--seed", "1"]),
    (["--mode", "grpo", "--grpo_max_steps", "2"], None, ["--max_steps", "2"]),
    (["--mode", "sft", "--max_steps", "4", "--eval_every", "2"], ["--max_steps", "4", "--eval_every", "2"], None),
])
def test_train_py_sizes_each_stage_with_max_steps(monkeypatch, argv, sft, grpo):
    """--max_steps sizes both stages of --mode both (TRL users reach for it first); --sft_max_steps and
    --grpo_max_steps size one each and win over it."""
    import train
    import train_grpo
    import train_sft

    got = {}
    monkeypatch.setattr(train_sft, "main", lambda a: got.__setitem__("sft", a))
    monkeypatch.setattr(train_grpo, "main", lambda a: got.__setitem__("grpo", a))
    train.main(argv)

    def tail(a):  # the stage's own flags, as train.py appends them after the shared ones
        return a[a.index("--max_steps"):]

    assert tail(got["sft"]) == sft if sft else "sft" not in got
    assert tail(got["grpo"]) == grpo if grpo else "grpo" not in got


@pytest.mark.parametrize("argv,says", [
    (["--mode", "eval", "--max_steps", "3"], "--mode eval trains nothing: drop --max_steps"),
    (["--mode", "grpo", "--sft_max_steps", "3"], "--sft_max_steps sizes SFT, which --mode grpo does not run"),
    (["--mode", "both", "--grpo_max_steps", "0"], "--grpo_max_steps must be >= 1 (got 0)"),
])
def test_train_py_refuses_a_stage_length_it_cannot_use(argv, says):
    import train
    from common.errors import UserError

    with pytest.raises(UserError, match="^" + re.escape(says)):
        train.main(argv)


def test_prompt_settings_travel_from_sft_to_grpo_to_eval(tmp_path, capsys):
    """SFT saves its prompt format beside the model; GRPO samples from the same prompt and saves it again;
    eval reads it back. A flag that differs from the saved one is used and said once, naming both."""
    from data.prompt import PROMPT_FILE
    from grpo.trainer import GRPOConfig, train_grpo
    from sft.trainer import SFTConfig, train_sft

    prompt = dict(system_prompt="Be brief.", instruction="Q: {question}", enable_thinking=True)
    sft = tmp_path / "sft"
    train_sft(SFTConfig(model_name="tiny", dataset="synthetic", sft_output=str(sft), max_steps=1, batch_size=4,
                        eval_samples=2, eval_max_new_tokens=4, device="cpu", show_progress=False, **prompt))
    saved = json.loads((sft / PROMPT_FILE).read_text())
    assert saved == {"system_prompt": "Be brief.", "instruction": "Q: {question}",
                     "chat_template_kwargs": {"enable_thinking": True}}
    assert "warning: SFT's evals: thinking is on" in capsys.readouterr().out

    seen = []

    def hook(step, prompts, answers):
        seen.extend(prompts)
        return [[5, 6, 2]] * (4 * len(prompts))

    grpo = tmp_path / "grpo"
    train_grpo(GRPOConfig(sft_output=str(sft), dataset="synthetic", grpo_output=str(grpo), max_steps=1,
                          prompts_per_step=2, max_completion_length=8, device="cpu", show_progress=False),
               rollout=hook)
    from models import load_tokenizer

    text = load_tokenizer("tiny").decode(seen[0])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ: ")
    assert text.endswith("<|im_start|>assistant\n")  # thinking on: no empty think block
    assert json.loads((grpo / PROMPT_FILE).read_text()) == saved
    line = json.loads((grpo / "grpo_training_logs.jsonl").read_text().splitlines()[-1])
    assert line["thinking_tokens_mean"] == 3 and line["thinking_closed_rate"] == 0.0  # [5, 6, eos]: never closed
    out = capsys.readouterr().out
    assert "warning: GRPO's rollouts: thinking is on but completions stop at 8 tokens" in out
    assert "differs" not in out

    train_grpo(GRPOConfig(sft_output=str(sft), dataset="synthetic", grpo_output=str(tmp_path / "g2"), max_steps=1,
                          prompts_per_step=2, max_completion_length=8, device="cpu", show_progress=False,
                          instruction="Solve: {question}"), rollout=hook)
    said = [line for line in capsys.readouterr().out.splitlines() if "differs" in line]
    assert said == [f"warning: --instruction 'Solve: {{question}}' differs from the 'Q: {{question}}' that {sft} was "
                    f"trained with ({sft / PROMPT_FILE}); using 'Solve: {{question}}'"]

    from eval.__main__ import main as eval_main

    eval_main(["--model", str(grpo), "--dataset", "synthetic", "--max_samples", "3", "--max_new_tokens", "6",
               "--output", str(tmp_path / "eval"), "--device", "cpu", "--no_progress"])
    summary = json.loads((tmp_path / "eval" / "eval_summary.json").read_text())
    assert summary["prompt_format"] == saved and 0 <= summary["thinking_closed_rate"] <= 1
