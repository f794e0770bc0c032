"""common/: the LR schedule at its boundaries, and flags declared once on the configs."""

import argparse
import dataclasses
import math
import subprocess
import sys

import pytest
import torch

from common.errors import UserError
from common.flags import add_flags, check, config_from_args
from common.schedule import LR_DECAYS, lr_factor, make_scheduler
from grpo.config import GRPOConfig
from sft.config import SFTConfig
from tests.conftest import ROOT, load_dev


def test_warmup_then_each_decay_at_its_boundaries():
    total, warm = 10, 4
    # warmup: 1/4, 2/4, 3/4, 4/4 of the peak over steps 0..3, the peak reached on the last warmup step
    for decay in LR_DECAYS:
        assert [lr_factor(s, total, warm, decay) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # the first step after warmup starts the decay at the peak; the schedule ends at 0 at step `total`
    assert lr_factor(4, total, warm, "cosine") == 1.0 and lr_factor(4, total, warm, "linear") == 1.0
    assert lr_factor(7, total, warm, "linear") == pytest.approx(0.5)
    assert lr_factor(7, total, warm, "cosine") == pytest.approx(0.5)
    assert lr_factor(9, total, warm, "linear") == pytest.approx(1 / 6)
    assert lr_factor(9, total, warm, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 6)))
    assert lr_factor(10, total, warm, "cosine") == pytest.approx(0.0) and lr_factor(10, total, warm, "linear") == 0
    assert lr_factor(50, total, warm, "cosine") == pytest.approx(0.0)  # past the end: stays at 0
    assert all(lr_factor(s, total, warm, "constant") == 1.0 for s in range(4, 20))
    assert lr_factor(0, total, 0, "cosine") == 1.0 and lr_factor(0, 1, 0, "linear") == 1.0  # no warmup
    assert lr_factor(3, 4, 4, "cosine") == 1.0 and lr_factor(4, 4, 4, "cosine") == 1.0  # all warmup, no decay
    with pytest.raises(ValueError):
        lr_factor(5, total, warm, "step")


def test_scheduler_applies_the_factors_step_by_step():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2.0)
    sched = make_scheduler(opt, 6, 2, "linear")
    seen = []
    for _ in range(6):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1.0, 2.0, 2.0, 1.5, 1.0, 0.5])


@pytest.mark.parametrize("cls", [GRPOConfig, SFTConfig])
def test_every_config_field_is_a_flag_with_its_default_and_help(cls):
    p = argparse.ArgumentParser()
    add_flags(p, cls)
    args = p.parse_args([])
    assert config_from_args(cls, args) == cls()  # the parser's defaults are the config's
    names = {a.dest: a for a in p._actions if a.dest != "help"}
    assert set(names) == {f.name for f in dataclasses.fields(cls)}
    assert all(a.help for a in names.values())
    assert "--no_progress" in names["show_progress"].option_strings


def test_values_outside_their_range_are_one_line_errors():
    with pytest.raises(UserError, match=r"^--top_p must be > 0 and <= 1 \(got 1.5\)$"):
        check(GRPOConfig(top_p=1.5))
    with pytest.raises(UserError, match=r"^--learning_rate must be >= 0 \(got nan\)$"):
        check(GRPOConfig(learning_rate=float("nan")))
    with pytest.raises(UserError, match=r"^--loss_type must be one of grpo, bnpo, dr_grpo, dapo \(got ppo\)$"):
        check(GRPOConfig(loss_type="ppo"))
    with pytest.raises(UserError, match=r"^--batch_size must be >= 1 \(got 0\)$"):
        check(SFTConfig(batch_size=0))
    check(GRPOConfig())
    check(SFTConfig())


def test_a_training_cli_stops_on_a_value_out_of_range_before_writing(tmp_path):
    """Through a real interpreter once (tests/test_bad_input.py drives every CLI's table in-process)."""
    result = subprocess.run([sys.executable, "train_grpo.py", "--prompts_per_step", "0", "--sft_output",
                             str(tmp_path / "s"), "--grpo_output", str(tmp_path / "g")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr == "error: --prompts_per_step must be >= 1 (got 0)\n"
    assert not (tmp_path / "s").exists() and not (tmp_path / "g").exists()


def test_one_finetuning_switch_for_both_trainers_and_the_old_flags_still_work(capsys):
    """--finetune full|lora on SFT and GRPO alike (their defaults differ: SFT lora, GRPO full); SFT's old
    --full_finetune and GRPO's old --lora still parse, each with a one-line note."""
    from common.flags import parse_flags

    for cls, default in ((SFTConfig, "lora"), (GRPOConfig, "full")):
        assert parse_flags(cls, [], None)[0].finetune == default
        for choice in ("full", "lora"):
            cfg = parse_flags(cls, ["--finetune", choice], None)[0]
            assert cfg.finetune == choice and cfg.lora == (choice == "lora")
    with pytest.raises(UserError, match=r"^--finetune must be one of full, lora \(got qlora\)$"):
        parse_flags(SFTConfig, ["--finetune", "qlora"], None)
    capsys.readouterr()
    assert parse_flags(SFTConfig, ["--full_finetune"], None)[0].finetune == "full"
    assert parse_flags(GRPOConfig, ["--lora"], None)[0].finetune == "lora"
    assert capsys.readouterr().out.splitlines() == ["note: --full_finetune is now --finetune full",
                                                    "note: --lora is now --finetune lora"]


def test_a_flag_that_turns_a_field_off_says_so_in_help():
    """A True field spelled --no_X: its help says what the field does, --help what the flag turns off."""
    parser = argparse.ArgumentParser()
    add_flags(parser, GRPOConfig)
    shown = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings}
    assert shown["--no_skip_zero_advantage"].startswith("turns off: skip the forward/backward of rows whose")
    assert shown["--no_progress"].startswith("turns off: a progress bar")
    assert "--lora" not in shown  # the old spelling is accepted, not advertised


def test_a_runs_run_config_replays_as_config_and_flags_override_it(tmp_path):
    """--config run_config.json gives back the run's config; a flag on the command line wins over the
    file; YAML works too (1e-6 included, which YAML reads as text)."""
    from common.flags import parse_flags
    from training.run import Run

    cfg = parse_flags(GRPOConfig, ["--beta", "0", "--reward", "numeric", "--reward", "format", "--learning_rate",
                                   "3e-6", "--report_to", "tensorboard", "--finetune", "lora"], None)[0]
    out = tmp_path / "run"
    Run(cfg, __import__("common.distributed", fromlist=["Dist"]).Dist(), out=str(out), flag="--grpo_output",
        stage="grpo", log_name="log.jsonl", start_model="tiny")
    replayed = parse_flags(GRPOConfig, ["--config", str(out / "run_config.json")], None)[0]
    assert replayed == cfg
    assert parse_flags(GRPOConfig, ["--config", str(out / "run_config.json"), "--beta", "0.5"], None)[0] == \
        dataclasses.replace(cfg, beta=0.5)
    (tmp_path / "c.yaml").write_text("learning_rate: 1e-6\nreward: [numeric, format]\nmax_steps: 3\n")
    from_yaml = parse_flags(GRPOConfig, ["--config", str(tmp_path / "c.yaml")], None)[0]
    assert (from_yaml.learning_rate, from_yaml.reward, from_yaml.max_steps) == (1e-6, ("numeric", "format"), 3)


def test_an_sft_run_config_given_to_grpo_says_whose_it_is(tmp_path):
    from common.flags import parse_flags

    path = tmp_path / "run_config.json"
    path.write_text('{"stage": "sft", "batch_size": 4}')
    with pytest.raises(UserError, match=r"unknown key 'batch_size' .*it is a sft run's config"):
        parse_flags(GRPOConfig, ["--config", str(path)], None)


def test_adamw_is_fused_on_cuda_only():
    """On CUDA one fused kernel updates every parameter; elsewhere torch's default keeps the CPU's numbers."""
    from common.schedule import adamw

    params = [torch.nn.Parameter(torch.randn(3))]
    assert adamw(params, "cuda", 1e-3).defaults["fused"] is True
    assert adamw(params, "cuda:1", 1e-3).defaults["fused"] is True
    assert not adamw(params, "cpu", 1e-3).defaults["fused"]


RULE_CASES = [  # (CLI, argv, CUDA devices the machine has, the rule's flags, the error line's start)
    ("train_grpo.py", ["--resume", "--overwrite"], 0, ("resume", "overwrite"), "--resume and --overwrite together"),
    ("train_grpo.py", ["--reward", "numeric", "--reward", "overlong", "--overlong_cache", "64",
                       "--max_completion_length", "8"], 0, ("reward", "overlong_cache", "max_completion_length"),
     "--reward overlong with --overlong_cache 64 >= --max_completion_length 8 punishes every completion"),
    ("train_grpo.py", ["--use_4bit"], 0, ("use_4bit", "finetune"), "--use_4bit trains LoRA adapters"),
    ("train_grpo.py", ["--device", "cpu", "--cuda_graphs", "on"], 0, ("cuda_graphs", "device"),
     "--cuda_graphs on needs a CUDA device, not cpu"),
    ("train_grpo.py", ["--eval_dataset", "synthetic:add"], 0, ("eval_dataset", "eval_every"),
     "--eval_dataset is scored at each --eval_every"),
    ("train_grpo.py", ["--keep_best"], 0, ("keep_best", "eval_every"), "--keep_best picks the best model"),
    ("train_grpo.py", ["--keep_snapshots", "2"], 0, ("keep_snapshots", "save_model_every"),
     "--keep_snapshots keeps the newest of --save_model_every's snapshots"),
    ("train_grpo.py", ["--device", "cuda"], 0, ("device",), "--device cuda: this machine has no CUDA device"),
    ("train_grpo.py", ["--device", "cuda:3"], 1, ("device",),
     "--device cuda:3: this machine has 1 CUDA device(s), cuda:0 to cuda:0"),
    ("train_grpo.py", ["--no_save", "--keep_best", "--eval_every", "1"], 0,
     ("save_models", "push_to_hub", "keep_best", "save_model_every"), "--no_save writes no model, so --keep_best"),
    ("train_sft.py", ["--no_save", "--save_model_every", "2"], 0,
     ("save_models", "push_to_hub", "keep_best", "save_model_every"), "--no_save writes no model, so --save_model"),
    ("train_sft.py", ["--resume", "--overwrite"], 0, ("resume", "overwrite"), "--resume and --overwrite together"),
    ("train_sft.py", ["--finetune", "full", "--use_4bit"], 0, ("use_4bit", "finetune"),
     "--use_4bit trains LoRA adapters"),
    ("train_sft.py", ["--keep_best"], 0, ("keep_best", "eval_every"), "--keep_best picks the best model"),
    ("train_sft.py", ["--keep_snapshots", "1"], 0, ("keep_snapshots", "save_model_every"), "--keep_snapshots keeps"),
    ("train_sft.py", ["--device", "cuda:1"], 0, ("device",), "--device cuda:1: this machine has no CUDA device"),
    ("train_grpo.py", ["--enable_thinking", "--chat_template_kwargs", '{"enable_thinking": false}'], 0,
     ("enable_thinking", "chat_template_kwargs"), "--enable_thinking with --chat_template_kwargs"),
    ("train_sft.py", ["--enable_thinking", "--chat_template_kwargs", '{"enable_thinking": false}'], 0,
     ("enable_thinking", "chat_template_kwargs"), "--enable_thinking with --chat_template_kwargs"),
    ("python -m eval", ["--model", "tiny", "--enable_thinking", "--chat_template_kwargs",
                        '{"enable_thinking": false}'], 0, ("enable_thinking", "chat_template_kwargs"),
     "--enable_thinking with --chat_template_kwargs"),
    ("python -m eval", ["--model", "tiny", "--num_samples", "2"], 0, ("num_samples", "temperature"),
     "--num_samples > 1 needs --temperature > 0"),
    ("python -m eval", ["--model", "tiny", "--cuda_graphs", "--static_batches"], 0, ("cuda_graphs", "device"),
     "--cuda_graphs on needs a CUDA device, not cpu"),
    ("python -m eval", ["--model", "tiny", "--device", "cuda", "--cuda_graphs", "on"], 1,
     ("cuda_graphs", "continuous"), "continuous batching refills a batch's rows"),
    ("python -m eval", ["--model", "tiny", "--device", "cuda:2"], 2, ("device",),
     "--device cuda:2: this machine has 2"),
]


def _rule_mains():
    import eval.__main__
    import train_grpo
    import train_sft

    return {"train_grpo.py": train_grpo.main, "train_sft.py": train_sft.main, "python -m eval": eval.__main__.main}


@pytest.mark.parametrize("cli,argv,gpus,flags,says", RULE_CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in RULE_CASES])
def test_settings_that_contradict_each_other_stop_in_one_line_before_anything_loads(cli, argv, gpus, flags, says,
                                                                                    capsys, monkeypatch, tmp_path):
    import torch

    import models.loading
    from common.errors import run_cli

    monkeypatch.chdir(tmp_path)  # nothing may be written, even into the default output folders
    monkeypatch.setattr(models.loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: _rule_mains()[cli](argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: {says}"), err
    assert list(tmp_path.iterdir()) == []


def test_every_rule_between_flags_has_a_case():
    """Each rule the configs declare (and the device check of every --device flag) is a row above."""
    from common.flags import rules_of
    from eval.__main__ import EvalArgs

    for cli, cls in (("train_grpo.py", GRPOConfig), ("train_sft.py", SFTConfig), ("python -m eval", EvalArgs)):
        declared = {r.flags for r in rules_of(cls)}
        covered = {flags for c, _, _, flags, _ in RULE_CASES if c == cli}
        assert declared == covered, (cli, declared ^ covered)


def test_the_flags_that_may_change_on_resume_are_the_ones_the_docs_list():
    """Each flag declared on_resume="may" is named in docs/training.md's resume section, and no other."""
    import re

    from common.flags import _fields, flag_name

    text = (ROOT / "docs" / "training.md").read_text()
    section = text[text.index("## Resume and interrupt"):]
    listed = set(re.findall(r"`(--[a-z_0-9]+)`", section[section.index("may change on resume"):
                                                         section.index("What changed is printed")]))
    may = {flag_name(f.name, meta) for cls in (GRPOConfig, SFTConfig) for f, meta, _ in _fields(cls)
           if meta["on_resume"] == "may"}
    assert may == listed, may ^ listed


HELP_CLIS = ["train_sft", "train_grpo", "train", "eval.__main__", "visualize_logs", "models.__main__", "models.push",
             "benchmarks.rollout", "benchmarks.step", "dev/prompt_sharing.py", "dev/trl_step.py", "dev/continuous.py",
             "dev/sft_step.py", "benchmarks.summary"]
# flags a help may name that are not its own: torchrun's, and a stage's that train.py / models.push speak of
OTHER_TOOLS_FLAGS = {"--help", "--nproc_per_node", "--standalone", "--beta", "--push_to_hub"}


@pytest.mark.parametrize("cli", HELP_CLIS)
def test_help_names_only_flags_that_exist_and_prints_examples_as_written(cli, capsys):
    """Each CLI's --help: every flag it names is one it takes (eval's once named a `--continuous` that is
    `--static_batches`), an example's line continuation prints as written (not joined into one line by a
    docstring's backslash), and one group holds the data flags."""
    import importlib
    import re

    with pytest.raises(SystemExit):
        module = load_dev(cli[4:-3]) if cli.startswith("dev/") else importlib.import_module(cli)
        module.main(["--help"])
    text = capsys.readouterr().out
    own = set(re.findall(r"^\s+(--[a-z_0-9]+)", text, re.M)) | set(re.findall(r"\[(--[a-z_0-9]+)", text))
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z_0-9]+", text))
    assert named - own - OTHER_TOOLS_FLAGS == set()
    for line in text.splitlines():
        if line.lstrip().startswith(("python", "torchrun")):
            assert not re.search(r"\S {4,}--", line), line  # a continuation joined into one line
    titles = [t for t in re.findall(r"^(\S[^\n]*):$", text, re.M) if "data" in t]
    assert len(titles) <= 1, titles


def test_a_second_run_into_the_same_folder_names_the_flags_and_the_python_keywords(tmp_path):
    """The README's Python example run twice: the refusal names overwrite=True, not only --overwrite."""
    from common.run_files import RUN_CONFIG, prepare_output_dir

    out = tmp_path / "run"
    prepare_output_dir(out, resume=False, overwrite=False, flag="--grpo_output")
    (out / RUN_CONFIG).write_text("{}")
    (out / "model.safetensors").write_text("")
    with pytest.raises(UserError, match=r"^--grpo_output .* already holds another run; pass --resume to continue "
                                        r"it, --overwrite to replace it, or choose another --grpo_output \(from "
                                        r"Python: resume=True, overwrite=True or another grpo_output\)$"):
        prepare_output_dir(out, resume=False, overwrite=False, flag="--grpo_output")
    prepare_output_dir(out, resume=False, overwrite=True, flag="--grpo_output")
    assert list(out.iterdir()) == []


def test_the_readme_training_commands_parse_as_written():
    """Every `train_sft.py` / `train_grpo.py` command in the README's code blocks (continuations joined)
    is accepted by its CLI's flags: an example never names a flag that does not exist."""
    import re
    import shlex

    from common.flags import parse_flags

    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    commands = [line.split("#")[0] for line in text.splitlines()
                if re.match(r"\.venv/bin/python train_(sft|grpo)\.py ", line) and "..." not in line]
    assert len(commands) >= 2
    for command in commands:
        words = shlex.split(command)
        parse_flags(SFTConfig if words[1] == "train_sft.py" else GRPOConfig, words[2:], None)


def test_a_config_file_may_hold_one_half_of_a_rule_the_command_line_completes(tmp_path):
    """The rules between flags apply to the merged settings, not to the file alone (keep_best in the file,
    --eval_every on the command line)."""
    from common.flags import parse_flags

    path = tmp_path / "c.yaml"
    path.write_text("keep_best: true\n")
    cfg = parse_flags(GRPOConfig, ["--config", str(path), "--eval_every", "5"], None)[0]
    assert cfg.keep_best and cfg.eval_every == 5
    with pytest.raises(UserError, match=r"^--keep_best picks the best model"):
        parse_flags(GRPOConfig, ["--config", str(path)], None)


def test_resume_takes_the_device_from_this_machine_not_the_saved_run(tmp_path):
    """A run started on a GPU (run_config.json says cuda) resumes here on the CPU's default, and its other
    settings still come from the run."""
    import json

    from common.flags import parse_flags

    (tmp_path / "run_config.json").write_text(json.dumps({"stage": "grpo", "device": "cuda", "max_steps": 7}))
    cfg = parse_flags(GRPOConfig, ["--resume", "--grpo_output", str(tmp_path)], None)[0]
    assert cfg.device is None and cfg.max_steps == 7
