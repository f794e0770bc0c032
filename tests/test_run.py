"""What both trainers do around their loop (training/run.py): snapshots along the way, the best model by a
validation slice of the training data, each a folder `from_pretrained` loads."""

from __future__ import annotations

import json

import pytest
import torch

from common.errors import UserError
from data import load_records, split_validation
from grpo.trainer import LOG_NAME, GRPOConfig, train_grpo


def _cfg(out, **overrides) -> GRPOConfig:
    base = dict(model_name="tiny", dataset="synthetic", grpo_output=str(out), max_steps=4, prompts_per_step=2,
                num_generations=4, micro_batch_size=8, max_completion_length=8, device="cpu", learning_rate=1e-2,
                beta=0.0, eval_samples=4, eval_max_new_tokens=8, show_progress=False, seed=5,
                reward=("numeric", "tests.test_run:shorter"))
    return GRPOConfig(**{**base, **overrides})


def shorter(completions, **kwargs):
    """Rewards differ within every group, so every step trains."""
    return [-len(c) / 100 for c in completions]


def _weights(folder):
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_snapshots_are_loadable_models_and_only_the_newest_are_kept(tmp_path, finetune):
    out = tmp_path / "run"
    train_grpo(_cfg(out, save_model_every=1, keep_snapshots=2, finetune=finetune, lora_r=4, lora_alpha=8))
    kept = sorted(p.name for p in (out / "snapshots").iterdir())
    assert kept == ["step_2", "step_3"]  # step 1 pruned; step 4 is the final model in the run folder
    two, three, final = (_weights(p) for p in (out / "snapshots" / "step_2", out / "snapshots" / "step_3", out))
    assert any(not torch.equal(two[k], three[k]) for k in two) and any(not torch.equal(three[k], final[k]) for k in two)
    for snap in kept:
        folder = out / "snapshots" / snap
        assert (folder / "README.md").is_file() and (folder / "prompt_format.json").is_file()
        assert json.loads((folder / "run_config.json").read_text())["finetune"] == finetune


def test_the_best_model_is_chosen_on_held_back_training_problems(tmp_path):
    out = tmp_path / "run"
    train_grpo(_cfg(out, eval_every=1, keep_best=True, validation_samples=6))
    log = [json.loads(x) for x in (out / LOG_NAME).read_text().splitlines()]
    scores = [(x["eval_validation_accuracy"], x["step"]) for x in log if x["step"] > 0]
    best = json.loads((out / "best" / "best.json").read_text())
    first_max = next(step for score, step in scores if score == max(s for s, _ in scores))
    assert best == {"step": first_max, "validation_accuracy": max(s for s, _ in scores)}
    assert _weights(out / "best").keys() == _weights(out).keys()
    # the validation problems come from the training split, and training no longer sees them
    questions = [json.loads(x)["question"] for x in (out / "eval" / "validation" / "eval_predictions.jsonl")
                 .read_text().splitlines()]
    train = [r["question"] for r in load_records("synthetic", "train", seed=5)]
    test = {r["question"] for r in load_records("synthetic", "test", seed=5)}
    assert len(questions) == 6 and set(questions) <= set(train) and not set(questions) & test
    rest, held = split_validation(load_records("synthetic", "train", seed=5), 6, 5)
    assert {r["question"] for r in held} == set(questions) and not {r["question"] for r in rest} & set(questions)


def test_keep_best_needs_evals_and_room_to_train(tmp_path):
    with pytest.raises(UserError, match=r"^--keep_best picks the best model at each held-out eval; give --eval_every"):
        train_grpo(_cfg(tmp_path / "a", keep_best=True))
    with pytest.raises(UserError, match=r"^--validation_samples 10 would leave no training data"):
        split_validation([{"question": "q"}] * 10, 10, 0)


def test_no_save_writes_nothing_and_refuses_what_would_keep_a_model(tmp_path):
    """--no_save (the benchmarks' runs): log and evals only, no checkpoint, no model; the flags that keep
    or publish a model are refused with it before anything loads."""
    train_grpo(_cfg(tmp_path / "a", save_models=False))
    written = {p.name for p in (tmp_path / "a").rglob("*") if p.is_file()}
    assert not {n for n in written if n.endswith((".safetensors", ".pt", ".bin"))} and "checkpoint" not in written
    assert "grpo_training_logs.jsonl" in written
    for extra, name in ((dict(keep_best=True, eval_every=1), "--keep_best"),
                        (dict(save_model_every=1), "--save_model_every"), (dict(push_to_hub="me/x"), "--push_to_hub")):
        with pytest.raises(UserError, match=f"^--no_save writes no model, so {name}"):
            train_grpo(_cfg(tmp_path / "b", save_models=False, **extra))
