"""Bad input, as a new user gives it: every CLI answers a value out of range with exit 2 and one
`error:` line, before any model loads; unloadable model folders and crashed saves are one line too,
and nothing written before is lost. Each row here is a row of the "Bad input" table in docs/errors.md."""

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

import benchmarks.drift
import benchmarks.rollout
import benchmarks.step
import benchmarks.summary
import eval.__main__
import models.__main__
import train
import train_grpo
import train_sft
import visualize_logs
from common import run_files
from common.errors import UserError, run_cli
from tests.conftest import ROOT, load_dev

prompt_sharing, trl_step = load_dev("prompt_sharing"), load_dev("trl_step")

CASES = [  # (CLI, its main, arguments, the error line's start)
    ("train_grpo.py", train_grpo.main, ["--prompts_per_step", "0"], "--prompts_per_step must be >= 1 (got 0)"),
    ("train_grpo.py", train_grpo.main, ["--micro_batch_size", "0"], "--micro_batch_size must be >= 1 (got 0)"),
    ("train_grpo.py", train_grpo.main, ["--max_completion_length", "0"], "--max_completion_length must be >= 1"),
    ("train_grpo.py", train_grpo.main, ["--learning_rate", "nan"], "--learning_rate must be >= 0 (got nan)"),
    ("train_grpo.py", train_grpo.main, ["--max_steps", "0"], "--max_steps must be >= 1 (got 0)"),
    ("train_grpo.py", train_grpo.main, ["--max_steps", "-3"], "--max_steps must be >= 1 (got -3)"),
    ("train_grpo.py", train_grpo.main, ["--rollout_correction_cap", "0.5"],
     "--rollout_correction_cap must be >= 1 (got 0.5)"),
    ("train_grpo.py", train_grpo.main, ["--top_p", "1.5"], "--top_p must be > 0 and <= 1 (got 1.5)"),
    ("train_grpo.py", train_grpo.main, ["--beta=-inf"], "--beta must be >= 0 (got -inf)"),
    ("train_grpo.py", train_grpo.main, ["--loss_type", "ppo"], "--loss_type must be one of grpo, bnpo, dr_grpo, dapo"),
    ("train_grpo.py", train_grpo.main, ["--num_generations", "1"], "--num_generations must be >= 2 (got 1)"),
    ("train_grpo.py", train_grpo.main, ["--max_prompt_length", "0"], "--max_prompt_length must be >= 1 (got 0)"),
    ("train_grpo.py", train_grpo.main, ["--dist_backend", "mpi"], "argument --dist_backend: invalid choice"),
    ("train_grpo.py", train_grpo.main, ["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    ("train_grpo.py", train_grpo.main, ["--top_k", "-1"], "--top_k must be >= 0 (got -1)"),
    ("train_grpo.py", train_grpo.main, ["--min_p", "1.5"], "--min_p must be >= 0 and <= 1 (got 1.5)"),
    ("train_grpo.py", train_grpo.main, ["--overlong_cache", "-4"], "--overlong_cache must be >= 0 (got -4)"),
    ("train_grpo.py", train_grpo.main, ["--reward_format", "xml"], "--reward_format must be one of text, messages"),
    ("train_grpo.py", train_grpo.main, ["--model_name", "tiny", "--chat_template_kwargs", "thinking"],
     "--chat_template_kwargs must be a JSON object"),
    ("train_grpo.py", train_grpo.main, ["--model_name", "tiny", "--instruction", "{q}"],
     "--instruction may hold {question} and no other placeholder (got {q}"),
    ("train_grpo.py", train_grpo.main, ["--device", "tpu"], "--device must be cpu, cuda or cuda:N (got tpu)"),
    ("train_sft.py", train_sft.main, ["--device", "cuda1"], "--device must be cpu, cuda or cuda:N (got cuda1)"),
    ("python -m eval", eval.__main__.main, ["--model", "tiny", "--device", "gpu"],
     "--device must be cpu, cuda or cuda:N (got gpu)"),
    ("benchmarks.rollout", benchmarks.rollout.main, ["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
    ("train_sft.py", train_sft.main, ["--model_name", "tiny", "--chat_template_kwargs", "[1]"],
     "--chat_template_kwargs must be a JSON object"),
    ("python -m eval", eval.__main__.main, ["--model", "tiny", "--top_k", "2.5"],
     "--top_k must be a whole number >= 0 (got 2.5)"),
    ("python -m eval", eval.__main__.main, ["--model", "tiny", "--min_p", "nan"], "--min_p must be >= 0 and <= 1"),
    ("python -m eval", eval.__main__.main, ["--model", "tiny", "--instruction", "{x} {question}"],
     "--instruction may hold {question} and no other placeholder"),
    ("train_sft.py", train_sft.main, ["--batch_size", "0"], "--batch_size must be >= 1 (got 0)"),
    ("train_sft.py", train_sft.main, ["--warmup_ratio", "2"], "--warmup_ratio must be >= 0 and <= 1 (got 2.0)"),
    ("train_sft.py", train_sft.main, ["--num_epochs", "1.5"], "--num_epochs must be a whole number >= 1 (got 1.5)"),
    ("train.py", train.main, ["--mode", "sft", "--batch_size", "0"], "--batch_size must be >= 1 (got 0)"),
    ("train.py", train.main, ["--mode", "grpo", "--beta", "-1"], "--beta must be >= 0 (got -1.0)"),
    ("train.py", train.main, ["--mode", "fly"], "argument --mode: invalid choice"),
    ("python -m eval", eval.__main__.main, ["--model", "tiny", "--max_new_tokens", "0"],
     "--max_new_tokens must be >= 1 (got 0)"),
    ("python -m eval", eval.__main__.main, ["--model", "tiny", "--temperature", "-1"], "--temperature must be >= 0"),
    ("python -m eval", eval.__main__.main, ["--model", "tiny", "--split", "dev"], "--split must be one of train, test"),
    ("python -m eval", eval.__main__.main, [], "the following arguments are required: --model"),
    ("benchmarks.rollout", benchmarks.rollout.main, ["--repeats", "0"], "--repeats must be >= 1 (got 0)"),
    ("benchmarks.rollout", benchmarks.rollout.main, ["--top_p", "0"], "--top_p must be > 0 and <= 1 (got 0.0)"),
    ("benchmarks.step", benchmarks.step.main, ["--steps", "0"], "--steps must be >= 1 (got 0)"),
    ("benchmarks.drift", benchmarks.drift.main, ["--precision", "fp16"], "--precision must be one of bf16, fp32"),
    ("benchmarks.step", benchmarks.step.main, ["--warmup", "-1"], "--warmup must be >= 0 (got -1)"),
    ("dev/prompt_sharing.py", prompt_sharing.main, ["--completion_tokens", "1"],
     "--completion_tokens must be >= 2 (got 1)"),
    ("dev/trl_step.py", trl_step.main, ["--max_new_tokens", "inf"],
     "--max_new_tokens must be a whole number >= 1 (got inf)"),
    ("benchmarks.summary", benchmarks.summary.main, [], "the following arguments are required: out_dir"),
    ("python -m models", models.__main__.main, ["--max_new_tokens", "0"], "--max_new_tokens must be >= 1 (got 0)"),
    ("visualize_logs.py", visualize_logs.main, ["--bogus", "1"], "unrecognized arguments: --bogus 1"),
]


@pytest.mark.parametrize("cli,main,argv,says", CASES, ids=[f"{c[0]} {' '.join(c[2])}" for c in CASES])
def test_every_cli_stops_on_bad_values_in_one_line(cli, main, argv, says, capsys, monkeypatch, tmp_path):
    import models.loading

    monkeypatch.chdir(tmp_path)  # nothing may be written, even into the default output folders
    monkeypatch.setattr(models.loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and err.startswith(f"error: {says}"), err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_every_numeric_and_choice_flag_has_a_declared_range():
    """No numeric or choice flag of a declared CLI goes unchecked (a missing range would accept nan)."""
    import dataclasses
    import typing

    from common.flags import _base_type
    from eval.__main__ import EvalArgs
    from grpo.config import GRPOConfig
    from sft.config import SFTConfig

    classes = [GRPOConfig, SFTConfig, EvalArgs, models.__main__.ModelCheckArgs, benchmarks.rollout.RolloutArgs,
               benchmarks.step.StepArgs, benchmarks.drift.DriftArgs,
               prompt_sharing.SharingArgs, trl_step.TRLStepArgs]
    counted = 0
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meta, base = f.metadata["flag"], _base_type(hints[f.name])
            if base in (int, float) or meta["choices"]:
                assert meta["choices"] or any(meta[k] is not None for k in ("low", "high", "above")), (cls, f.name)
                counted += 1
    assert counted >= 89, counted


def _broken_copy(tmp_path, name, tiny):
    folder = tmp_path / name
    shutil.copytree(tiny, folder)
    return folder


def test_model_folders_that_cannot_load_are_one_line(tmp_path):
    from models import load_model_and_tokenizer
    from models.tiny import tiny_dir

    tiny = tiny_dir()
    no_tokenizer = _broken_copy(tmp_path, "no_tokenizer", tiny)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (no_tokenizer / f).unlink()
    no_weights = _broken_copy(tmp_path, "no_weights", tiny)
    (no_weights / "model.safetensors").unlink()
    corrupt = _broken_copy(tmp_path, "corrupt", tiny)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    unknown = _broken_copy(tmp_path, "unknown", tiny)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "qwen99",
                                                     "architectures": ["Qwen99ForCausalLM"]}))
    for folder, says in ((no_tokenizer, "has no tokenizer"), (no_weights, "has no weights"),
                         (corrupt, "a weights file is corrupt or truncated"),
                         (unknown, "names an architecture transformers")):
        with pytest.raises(UserError) as info:
            load_model_and_tokenizer(str(folder), device="cpu")
        assert str(folder) in str(info.value) and says in str(info.value) and "\n" not in str(info.value)
    result = subprocess.run([sys.executable, "-m", "eval", "--model", str(no_tokenizer), "--dataset", "synthetic"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "has no tokenizer" in result.stderr


def _checkpointed_run(tmp_path, **overrides):
    from grpo.trainer import GRPOConfig, train_grpo

    cfg = dict(model_name="tiny", dataset="synthetic", grpo_output=str(tmp_path / "run"), max_steps=2, save_every=1,
               prompts_per_step=2, num_generations=2, micro_batch_size=4, max_completion_length=6, device="cpu",
               beta=0.0, show_progress=False, seed=1, max_samples=16)  # 16 prompts: little to encode
    return train_grpo(GRPOConfig(**{**cfg, **overrides}))


def test_a_crash_between_the_checkpoint_renames_is_recovered_on_resume(tmp_path, monkeypatch):
    """Killed after the old checkpoint moved aside and before the new one moved in: only .checkpoint.old
    is left. --resume puts it back and continues from its step."""
    from pathlib import Path

    real_rename = Path.rename

    def killed_before_the_second_rename(self, target):  # only once an old checkpoint was moved aside
        if self.name.startswith(".checkpoint.tmp-") and (self.parent / ".checkpoint.old").exists():
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_before_the_second_rename)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _checkpointed_run(tmp_path, max_steps=2)
    monkeypatch.setattr(Path, "rename", real_rename)
    assert not (out / "checkpoint").exists() and (out / ".checkpoint.old").is_dir()  # step 1's, moved aside
    record = _checkpointed_run(tmp_path, max_steps=3, resume=True)
    assert record["step"] == 3 and (out / "checkpoint").is_dir() and not (out / ".checkpoint.old").exists()


def test_atomic_dir_crash_leaves_old_and_recovery_restores_it(tmp_path, monkeypatch):
    from pathlib import Path

    target = tmp_path / "checkpoint"
    run_files.atomic_dir(target, lambda tmp: (tmp / "a.txt").write_text("first"))
    real_rename = Path.rename
    monkeypatch.setattr(Path, "rename", lambda self, to: (_ for _ in ()).throw(KeyboardInterrupt)
                        if self.name.startswith(".checkpoint.tmp-") else real_rename(self, to))
    with pytest.raises(KeyboardInterrupt):
        run_files.atomic_dir(target, lambda tmp: (tmp / "a.txt").write_text("second"))
    monkeypatch.setattr(Path, "rename", real_rename)
    assert not target.exists() and (tmp_path / ".checkpoint.old" / "a.txt").read_text() == "first"
    run_files.recover_dir(target)
    assert (target / "a.txt").read_text() == "first" and not (tmp_path / ".checkpoint.old").exists()


def test_a_full_disk_stops_in_one_line_and_keeps_the_last_checkpoint(tmp_path):
    target = tmp_path / "checkpoint"
    run_files.atomic_dir(target, lambda tmp: (tmp / "a.txt").write_text("good"))

    def disk_full(tmp):
        (tmp / "half").write_text("x")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match="cannot write .*checkpoint \\(No space left on device\\)"):
        run_files.atomic_dir(target, disk_full)
    assert (target / "a.txt").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no temporary folder left behind


def test_saved_models_are_readable_as_the_umask_says(tmp_path):
    old = os.umask(0o022)
    try:
        _checkpointed_run(tmp_path, max_steps=1)
    finally:
        os.umask(old)
    out = tmp_path / "run"
    for path in [out / "model.safetensors", out / "config.json", out / "checkpoint",
                 out / "checkpoint" / "model.safetensors"]:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


def test_long_prompts_are_skipped_and_counted(tmp_path, tiny_tokenizer):
    from data import make_synthetic
    from data.prompt import encode_prompt, prompts_within
    from eval.evaluate import evaluate
    from models import load_model
    from sampling import Sampler, SamplingParams

    records = make_synthetic("test", max_samples=6)
    records[2] = {**records[2], "question": records[2]["question"] + " Also" * 300}
    lengths = [len(encode_prompt(tiny_tokenizer, r["question"])) for r in records]
    limit = sorted(lengths)[-2]
    kept, prompts, skipped = prompts_within(tiny_tokenizer, records, limit)
    assert skipped == 1 and records[2] not in kept and len(prompts) == 5
    model = load_model("tiny", device="cpu", tokenizer=tiny_tokenizer)
    sampler = Sampler(model, eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
    params = SamplingParams(max_new_tokens=4)
    summary, predictions = evaluate(sampler, tiny_tokenizer, records, params, show_progress=False,
                                    max_prompt_length=limit)
    assert summary["prompts_skipped"] == 1 and len(predictions) == 5
    with pytest.raises(UserError, match="every one of the 6 problems has a prompt longer"):
        evaluate(sampler, tiny_tokenizer, records, params, show_progress=False, max_prompt_length=5)
    record = _checkpointed_run(tmp_path, max_steps=1, max_prompt_length=60, max_samples=8)
    assert record["prompts_skipped"] > 0


@pytest.mark.parametrize("case", ["a file", "under a file", "not writable"])
def test_an_output_folder_that_cannot_hold_the_run_is_one_line_naming_it(case, tmp_path, capsys, monkeypatch):
    import models.loading

    monkeypatch.setattr(models.loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "file.txt").write_text("mine")
    out, says = {"a file": (tmp_path / "file.txt", "is a file, not a folder"),
                 "under a file": (tmp_path / "file.txt" / "run", f"cannot create it ({tmp_path / 'file.txt'} is a "
                                                                 "file, not a folder)"),
                 "not writable": (tmp_path / "locked" / "run", f"{tmp_path} is not writable by this user")}[case]
    if case == "not writable":  # as root every folder is writable: the check is what is tested
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    for main, flag in ((train_grpo.main, "--grpo_output"), (train_sft.main, "--sft_output")):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda m=main, f=flag: m(["--model_name", "tiny", "--dataset", "synthetic", f, str(out)]))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: {flag} {out}") and says in err, err
    assert (tmp_path / "file.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_a_disk_full_while_checkpointing_is_one_line_and_the_last_checkpoint_resumes(tmp_path, monkeypatch):
    calls = []
    real = run_files.save_tensors

    def full_on_the_second(state, path):
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(state, path)

    monkeypatch.setattr(run_files, "save_tensors", full_on_the_second)
    out = tmp_path / "run"
    with pytest.raises(UserError) as info:
        _checkpointed_run(tmp_path, max_steps=3, save_every=1)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"cannot write {out / 'checkpoint'} (No space left on device)")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary folder left
    ckpt = out / "checkpoint"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 1  # step 1's, whole
    assert run_files.safe_load(ckpt / "trainer_state.pt")["step"] == 1 and run_files.load_tensors(
        ckpt / "model.safetensors", "cpu")
    monkeypatch.setattr(run_files, "save_tensors", real)
    assert _checkpointed_run(tmp_path, max_steps=3, save_every=1, resume=True)["step"] == 3


class _Payload:
    """What a tampered checkpoint would hold: unpickling it runs code (here: writes a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_a_tampered_checkpoint_is_refused_in_one_line_and_runs_no_code(tmp_path):
    """Each file of a checkpoint replaced by one whose loading would run code: --resume refuses it, names it,
    and the code never runs."""
    import pickle

    import torch

    _checkpointed_run(tmp_path, max_steps=1)
    marker, ckpt = tmp_path / "marker", tmp_path / "run" / "checkpoint"
    for name, how in (("optimizer.pt", "torch.save"), ("scheduler.pt", "pickle"), ("trainer_state.pt", "torch.save"),
                      ("model.safetensors", "pickle")):
        good = (ckpt / name).read_bytes()
        if how == "pickle":
            (ckpt / name).write_bytes(pickle.dumps(_Payload(marker)))
        else:
            torch.save({"state": _Payload(marker)}, ckpt / name)
        with pytest.raises(UserError) as info:
            _checkpointed_run(tmp_path, max_steps=2, resume=True)
        assert not marker.exists(), name
        message = str(info.value)
        assert "\n" not in message and str(ckpt) in message, message
        assert "refusing to load" in message or "cannot read the weights" in message, message
        (ckpt / name).write_bytes(good)
    assert _checkpointed_run(tmp_path, max_steps=2, resume=True)["step"] == 2  # the untampered one resumes


def test_a_checkpoint_missing_any_file_is_refused_in_one_line(tmp_path):
    """Each file --resume reads, taken away in turn: one line naming it, before anything loads."""
    _checkpointed_run(tmp_path, max_steps=1)
    ckpt = tmp_path / "run" / "checkpoint"
    for name in ("trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.pt"):
        kept = (ckpt / name).rename(tmp_path / name)
        with pytest.raises(UserError) as info:
            _checkpointed_run(tmp_path, max_steps=2, resume=True)
        message = str(info.value)
        assert "\n" not in message and f"lacks {name};" in message and str(ckpt) in message, message
        kept.rename(ckpt / name)
    assert _checkpointed_run(tmp_path, max_steps=2, resume=True)["step"] == 2
