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
# --- a run is its run_config.json: --resume continues it with its own settings ---

# a tiny run: 16 prompts (few to encode), completions of at most 6 tokens
GRPO_ARGS = ["--model_name", "tiny", "--dataset", "synthetic", "--max_steps", "2", "--prompts_per_step", "2",
             "--num_generations", "2", "--micro_batch_size", "4", "--max_completion_length", "6", "--beta", "0",
             "--learning_rate", "5e-3", "--reward", "numeric", "--reward", "tests.test_run:shorter", "--seed", "3",
             "--save_every", "1", "--max_samples", "16", "--no_progress", "--device", "cpu"]


def _cli(main, argv, capsys):
    """(exit code, stdout, stderr) of a CLI run in this process, as run_cli runs it."""
    from common.errors import run_cli

    try:
        run_cli(lambda: main(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_a_bare_resume_continues_the_run_with_its_own_settings(tmp_path, capsys):
    import train_grpo

    out = tmp_path / "run"
    assert _cli(train_grpo.main, GRPO_ARGS + ["--grpo_output", str(out)], capsys)[0] == 0
    saved = json.loads((out / "run_config.json").read_text())
    # only a setting that may change on resume is given: the rest is the run's own, not the defaults
    code, stdout, _ = _cli(train_grpo.main, ["--resume", "--grpo_output", str(out), "--max_steps", "3"], capsys)
    assert code == 0
    assert "resuming" in stdout and "at step 2/3 (changed: --max_steps 2 -> --max_steps 3)" in stdout
    log = [json.loads(x) for x in (out / LOG_NAME).read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2, 3] and log[-1]["kl"] == 0.0  # beta 0 as saved, not the default 0.01
    assert any(k.startswith("reward_") and "shorter" in k for k in log[-1])  # both saved rewards, not numeric alone
    now = json.loads((out / "run_config.json").read_text())
    assert now == {**saved, "max_steps": 3}  # the run's config says what it trained with
    resumes = [json.loads(x) for x in (out / "resumes.jsonl").read_text().splitlines()]
    assert [(r["step"], r["changed"]) for r in resumes] == [(2, {"max_steps": [2, 3]})]


def test_resume_refuses_settings_that_would_change_the_run_in_one_line(tmp_path, capsys):
    import train_grpo as grpo_cli
    import train_sft

    out = tmp_path / "run"
    assert _cli(grpo_cli.main, GRPO_ARGS + ["--grpo_output", str(out)], capsys)[0] == 0
    before = (out / LOG_NAME).read_text()
    code, _, err = _cli(grpo_cli.main, ["--resume", "--grpo_output", str(out), "--beta", "0.04",
                                          "--max_completion_length", "8", "--eval_every", "1"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "--beta 0.04 (saved: --beta 0.0)" in err and "--max_completion_length 8 (saved: --max_completion_length 6)" \
        in err and "eval_every" not in err  # --eval_every may change on resume
    assert (out / LOG_NAME).read_text() == before and not (out / "resumes.jsonl").exists()
    # the Python API too: a config that differs from the saved one stops before anything loads
    from common.flags import read_run_config

    saved = read_run_config(str(out), GRPOConfig, "--grpo_output")
    with pytest.raises(UserError, match=r"^--resume continues the run saved in .*; --seed 4 \(saved: --seed 3\) would"):
        train_grpo(GRPOConfig(**{**saved, "seed": 4, "resume": True}))
    code, _, err = _cli(grpo_cli.main, ["--resume", "--grpo_output", str(out), "--max_steps", "1"], capsys)
    assert code == 2 and "--max_steps 1 is below the checkpoint's step 2" in err, err
    # no run there, and SFT's the same way
    code, _, err = _cli(grpo_cli.main, ["--resume", "--grpo_output", str(tmp_path / "none")], capsys)
    assert code == 2 and "holds no run to resume" in err
    sft = tmp_path / "sft"
    sft_args = ["--model_name", "tiny", "--dataset", "synthetic", "--max_steps", "1", "--batch_size", "4",
                "--max_samples", "16", "--eval_samples", "2", "--eval_max_new_tokens", "4", "--no_progress",
                "--device", "cpu", "--sft_output", str(sft)]
    assert _cli(train_sft.main, sft_args, capsys)[0] == 0
    code, _, err = _cli(train_sft.main, ["--resume", "--sft_output", str(sft), "--learning_rate", "1"], capsys)
    assert code == 2 and "--learning_rate 1.0 (saved: --learning_rate 0.0002)" in err
    code, stdout, _ = _cli(train_sft.main, ["--resume", "--sft_output", str(sft), "--max_steps", "2"], capsys)
    assert code == 0 and "at step 1/2" in stdout
    assert [json.loads(x)["step"] for x in (sft / "sft_training_logs.jsonl").read_text().splitlines()] == [1, 2]


# --- an interrupt keeps the work ---

INTERRUPT = {"at": None}  # the step (1-based) during whose rollout shorter_interrupted sends SIGINT to this process


def shorter_interrupted(completions, trainer_state, **kwargs):
    """`shorter`, and Ctrl-C as a user presses it while the step INTERRUPT names is under way."""
    import os
    import signal

    if INTERRUPT["at"] == trainer_state.global_step + 1:
        os.kill(os.getpid(), signal.SIGINT)
    return shorter(completions)


def _weights_and_log(out):
    import hashlib

    from common.run_files import is_measured

    log = [{k: v for k, v in json.loads(x).items() if not is_measured(k)}
           for x in (out / LOG_NAME).read_text().splitlines()]
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest(), log


def test_ctrl_c_before_the_first_checkpoint_keeps_the_work_and_a_bare_resume_ends_bit_identical(tmp_path, capsys):
    import train_grpo as grpo_cli

    args = [a for a in GRPO_ARGS if a not in ("--save_every", "1")] + ["--max_steps", "4"]  # default: every 50
    args[args.index("tests.test_run:shorter")] = "tests.test_run:shorter_interrupted"
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert _cli(grpo_cli.main, args + ["--grpo_output", str(straight)], capsys)[0] == 0
    INTERRUPT["at"] = 2
    try:
        code, _, err = _cli(grpo_cli.main, args + ["--grpo_output", str(out)], capsys)
    finally:
        INTERRUPT["at"] = None
    assert code == 130
    assert "SIGINT: stopping after this step" in err
    assert (f"interrupted (SIGINT) after step 2/4; checkpoint in {out / 'checkpoint'}. Resume with: python "
            f"train_grpo.py --resume --grpo_output {out}") in err, err
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    assert [json.loads(x)["step"] for x in (out / LOG_NAME).read_text().splitlines()] == [1, 2]
    assert _cli(grpo_cli.main, ["--resume", "--grpo_output", str(out)], capsys)[0] == 0  # the command it printed
    assert _weights_and_log(out) == _weights_and_log(straight)


def test_a_second_signal_leaves_at_once_and_the_handlers_are_put_back():
    import os
    import signal

    from training.run import StopSignals, restores_signals

    before = signal.getsignal(signal.SIGTERM)
    stop = StopSignals()

    @restores_signals
    def train():
        stop.listen()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"  # the first: the step goes on
        os.kill(os.getpid(), signal.SIGINT)  # the second: out at once
        pytest.fail("still running after the second signal")

    with pytest.raises(KeyboardInterrupt):
        train()
    assert signal.getsignal(signal.SIGTERM) is before


def test_under_torchrun_the_agents_forwarded_signal_is_not_a_second_one(monkeypatch):
    import os
    import signal

    from training.run import StopSignals, restores_signals

    monkeypatch.setenv("WORLD_SIZE", "2")  # launched by torchrun, as common.distributed tells it
    stop = StopSignals()

    @restores_signals
    def train():
        stop.listen()
        os.kill(os.getpid(), signal.SIGINT)  # the terminal's Ctrl-C
        os.kill(os.getpid(), signal.SIGINT)  # torchrun passing the same on, at once: the step goes on
        assert stop.requested == "SIGINT"
        stop.first_at -= StopSignals.FORWARDED_S  # a person pressing again, later: out at once
        os.kill(os.getpid(), signal.SIGINT)
        pytest.fail("still running after a second Ctrl-C")

    with pytest.raises(KeyboardInterrupt):
        train()


def test_overwrite_deletes_nothing_until_the_data_is_good_and_saves_no_resume_or_overwrite(tmp_path):
    """--overwrite with a dataset that does not load leaves the old run whole; a run's run_config.json (and
    every model folder's copy) replays as a new run: resume and overwrite at their defaults."""
    out = tmp_path / "a"
    train_grpo(_cfg(out, max_steps=1))
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(UserError):
        train_grpo(_cfg(out, max_steps=1, overwrite=True, dataset=str(tmp_path / "missing.jsonl")))
    assert sorted(p.name for p in out.iterdir()) == before
    train_grpo(_cfg(out, max_steps=1, overwrite=True))
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["overwrite"] is False and saved["resume"] is False


def test_both_trainers_refuse_a_run_where_nothing_fits_and_say_skips_once(capsys):
    # one rule for SFT's examples (--max_length) and GRPO's prompts (--max_prompt_length)
    from common.distributed import Dist
    from training.run import check_lengths

    for what, flag in (("example", "--max_length"), ("prompt", "--max_prompt_length")):
        with pytest.raises(UserError) as info:
            check_lengths(0, 5, 5, what, flag, 64, Dist(), "logged")
        assert str(info.value) == f"every training {what} is longer than {flag} 64 tokens; raise {flag}"
    check_lengths(3, 2, 5, "prompt", "--max_prompt_length", 64, Dist(rank=1, world_size=2), "logged as x")
    assert capsys.readouterr().out == ""  # another rank says nothing
    check_lengths(3, 2, 5, "prompt", "--max_prompt_length", 64, Dist(), "logged as x")
    assert capsys.readouterr().out == "skipped 2 of 5 training prompts longer than --max_prompt_length 64 tokens " \
                                      "(logged as x)\n"
