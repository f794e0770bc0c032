"""Watching a run (training/trackers.py, training/run.py): TensorBoard events equal the JSONL log, also
across a resume; a W&B stand-in sees init/log/finish and the stored run id; completions.jsonl holds what
each completion scored and whether it trained; eval predictions are kept per step."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from common.errors import UserError
from grpo.trainer import LOG_NAME, GRPOConfig, train_grpo
from tests.conftest import crash_at_checkpoint
from training.run import COMPLETIONS
from training.trackers import metric_name, tracked


def _fixed(tokenizer):
    """Completions of different lengths, right and wrong in every group (rewards differ, so rows train)."""
    def hook(step, prompts, answers):
        rows = []
        for answer in answers:
            for k in range(4):
                text = (f"#### {answer}" if k % 2 == 0 else "#### 0") + " and more" * k
                rows.append(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        return rows
    return hook


def _cfg(out, **overrides) -> GRPOConfig:
    base = dict(model_name="tiny", dataset="synthetic", grpo_output=str(out), max_steps=4, prompts_per_step=2,
                num_generations=4, micro_batch_size=4, max_completion_length=16, device="cpu", learning_rate=1e-3,
                beta=0.0, eval_every=2, eval_samples=4, eval_max_new_tokens=8, save_every=2, show_progress=False,
                seed=5)
    return GRPOConfig(**{**base, **overrides})


def _log(out) -> list[dict]:
    return [json.loads(x) for x in (out / LOG_NAME).read_text().splitlines()]


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_names_are_grouped_and_only_finite_numbers_go():
    assert [metric_name(k) for k in ("eval_accuracy", "reward_numeric_mean", "adv_std", "grpo_loss",
                                     "generation_time_s", "peak_memory_gb")] == \
        ["eval/accuracy", "reward/numeric_mean", "reward/adv_std", "train/grpo_loss", "time/generation_time_s",
         "system/peak_memory_gb"]
    assert tracked({"step": 3, "device": "cpu", "loss": 1.5, "kl": float("nan"), "masked_rows": 0, "ok": True,
                    "seed": 42, "world_size": 1}) == {"train/loss": 1.5, "train/masked_rows": 0.0}  # no train/seed


def test_tensorboard_events_equal_the_log_before_and_after_a_resume(tmp_path, tiny_tokenizer, monkeypatch):
    """A run that crashes after logging step 3 (its checkpoint is at step 2) and is resumed: every
    scalar at every step once, equal to the JSONL log's value there (the step-3 events written before
    the crash are purged, not shown twice), and completions.jsonl cut back the same way."""
    out = tmp_path / "run"
    watch = dict(report_to=("tensorboard",), log_completions="1")
    with crash_at_checkpoint(monkeypatch, 3):
        train_grpo(_cfg(out, **watch), rollout=_fixed(tiny_tokenizer))
    assert [x["step"] for x in _log(out)] == [0, 1, 2, 3]
    steps = [json.loads(x)["step"] for x in (out / COMPLETIONS).read_text().splitlines()]
    assert steps == [1] * 4 + [2] * 4 + [3] * 4
    train_grpo(_cfg(out, **watch, resume=True), rollout=_fixed(tiny_tokenizer))
    # completions.jsonl is cut back to the checkpoint like the log: step 3's rows once, not twice
    steps = [json.loads(x)["step"] for x in (out / COMPLETIONS).read_text().splitlines()]
    assert steps == [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4

    log = _log(out)
    assert [x["step"] for x in log] == [0, 1, 2, 3, 4]
    # in the run's own folder, not a subfolder named after it: `tensorboard --logdir runs/` shows `run/tracker`
    assert not (out / "tracker" / "run").exists()
    scalars = _scalars(out / "tracker")
    assert "train/seed" not in scalars and "train/world_size" not in scalars
    for line in log:
        for name, value in tracked(line).items():
            at = [v for s, v in scalars[name] if s == line["step"]]
            assert at == [pytest.approx(value, rel=1e-6)], (name, line["step"], at)
    assert [s for s, _ in scalars["train/grpo_loss"]] == [1, 2, 3, 4]
    assert [s for s, _ in scalars["eval/accuracy"]] == [0, 2, 4]


def test_a_wandb_stand_in_sees_the_run_and_its_resume_id(tmp_path, tiny_tokenizer, monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = types.SimpleNamespace(name="wandb")  # importlib finds it
    fake.init = lambda **kw: calls.append(("init", kw)) or types.SimpleNamespace(id=kw["id"])
    fake.log = lambda metrics, step: calls.append(("log", step, metrics))
    fake.finish = lambda: calls.append(("finish",))
    fake.Table = lambda columns, data: ("table", columns, data)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == "wandb" else None)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    out = tmp_path / "run"
    train_grpo(_cfg(out, max_steps=2, report_to=("wandb",), run_name="mine", log_completions="1"),
               rollout=_fixed(tiny_tokenizer))
    init = calls[0][1]
    assert init["dir"] == str(tmp_path / "wandb_home")  # W&B's own WANDB_DIR is honoured
    assert calls[0][0] == "init" and init["name"] == "mine" and init["resume"] == "allow"
    assert init["config"]["loss_type"] == "dapo" and calls[-1] == ("finish",)
    logged = {step: m for kind, step, m in (c for c in calls if c[0] == "log") if "train/grpo_loss" in m}
    for line in _log(out)[1:]:
        assert logged[line["step"]]["train/grpo_loss"] == pytest.approx(line["grpo_loss"])
    tables = [c for c in calls if c[0] == "log" and "completions" in c[2]]
    assert len(tables) == 2 and len(tables[0][2]["completions"][2]) == 4  # one group of 4, each step
    # a resumed run continues the same W&B run: the id stored at the first start
    calls.clear()
    train_grpo(_cfg(out, max_steps=3, report_to=("wandb",), run_name="mine", resume=True),
               rollout=_fixed(tiny_tokenizer))
    assert calls[0][1]["id"] == init["id"]
    calls.clear()  # --logging_dir wins over WANDB_DIR
    train_grpo(_cfg(tmp_path / "r2", max_steps=1, report_to=("wandb",), logging_dir=str(tmp_path / "logs")),
               rollout=_fixed(tiny_tokenizer))
    assert calls[0][1]["dir"] == str(tmp_path / "logs")


def test_a_missing_tracker_package_is_one_line_before_any_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(UserError, match=r"^--report_to wandb needs the wandb package: pip install wandb"):
        train_grpo(_cfg(tmp_path / "a", report_to=("wandb",)))
    with pytest.raises(UserError, match=r"^--report_to must be one of tensorboard, wandb, trackio \(got mlflow\)$"):
        train_grpo(_cfg(tmp_path / "b", report_to=("mlflow",)))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_completions_log_the_rewards_advantages_and_trained_rows(tmp_path, tiny_tokenizer):
    """completions.jsonl: each completion with its rewards and the advantage computed from them, rows
    marked trained adding up to backward_rows (beta 0 skips the zero-advantage ones), and its lines cut
    back with the log on --resume."""
    from grpo.loss import group_advantages

    out = tmp_path / "run"

    def hook(step, prompts, answers):  # group 0 right/wrong (a signal); group 1 all wrong (advantage 0)
        rows = _fixed(tiny_tokenizer)(step, prompts, answers)
        wrong = tiny_tokenizer("#### 0", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
        return rows[:4] + [wrong] * 4

    train_grpo(_cfg(out, max_steps=2, log_completions="all", reward=("numeric", "format"), reward_weights=(1.0, 0.5),
                    eval_every=0), rollout=hook)
    rows = [json.loads(x) for x in (out / COMPLETIONS).read_text().splitlines()]
    log = _log(out)
    assert [r["step"] for r in rows] == [1] * 8 + [2] * 8
    for step in (1, 2):
        mine = [r for r in rows if r["step"] == step]
        reward = torch.tensor([r["reward_numeric"] + 0.5 * r["reward_format"] for r in mine])
        assert [r["reward"] for r in mine] == pytest.approx(reward.tolist())
        assert [r["advantage"] for r in mine] == pytest.approx(group_advantages(reward, 4).tolist(), abs=1e-6)
        assert sum(r["trained"] for r in mine) == log[step - 1]["backward_rows"] == 4
        assert all(r["trained"] == (r["advantage"] != 0) for r in mine)
        assert {r["rollout"] for r in mine} == {0} and all(r["completion"].startswith("#### ") for r in mine)
        assert all(r["tokens"] > 0 and r["truncated"] is False and "question" in r and "answer" in r for r in mine)


def test_each_in_training_eval_keeps_its_predictions(tmp_path, tiny_tokenizer):
    out = tmp_path / "run"
    train_grpo(_cfg(out, max_steps=2, eval_every=1), rollout=_fixed(tiny_tokenizer))
    for step in (0, 1, 2):
        summary = json.loads((out / "eval" / f"step_{step}" / "eval_summary.json").read_text())
        line = next(x for x in _log(out) if x["step"] == step)
        assert summary["accuracy"] == line["eval_accuracy"]
        assert len((out / "eval" / f"step_{step}" / "eval_predictions.jsonl").read_text().splitlines()) == 4


def test_sft_reports_to_tensorboard_too(tmp_path):
    from sft.trainer import LOG_NAME as SFT_LOG
    from sft.trainer import SFTConfig, train_sft

    out = tmp_path / "sft"
    train_sft(SFTConfig(model_name="tiny", dataset="synthetic", sft_output=str(out), max_samples=32, batch_size=8,
                        max_steps=3, eval_samples=4, eval_max_new_tokens=8, device="cpu", show_progress=False,
                        report_to=("tensorboard",), run_name="sft-run"))
    log = [json.loads(x) for x in (out / SFT_LOG).read_text().splitlines()]
    scalars = _scalars(out / "tracker" / "sft-run")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([x["loss"] for x in log])


def test_a_trackio_stand_in_sees_the_run_by_its_stored_name(tmp_path, tiny_tokenizer, monkeypatch):
    calls = []
    fake = types.ModuleType("trackio")
    fake.init = lambda **kw: calls.append(("init", kw))
    fake.log = lambda metrics, step: calls.append(("log", step, metrics))
    fake.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "trackio", fake)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == "trackio" else None)
    out = tmp_path / "run"
    train_grpo(_cfg(out, max_steps=2, report_to=("trackio",), run_name="t"), rollout=_fixed(tiny_tokenizer))
    first = calls[0][1]
    assert first["name"].startswith("t-") and first["resume"] == "allow" and calls[-1] == ("finish",)
    assert sorted(step for kind, step, *_ in (c for c in calls if c[0] == "log")) == [0, 1, 2]
    calls.clear()
    train_grpo(_cfg(out, max_steps=3, report_to=("trackio",), run_name="t", resume=True),
               rollout=_fixed(tiny_tokenizer))
    assert calls[0][1]["name"] == first["name"]  # the resumed run continues the same Trackio run
