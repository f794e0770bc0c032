"""common/config_keys.py through --config: TRL's keys, the flags as --help spells them, switches that take
true/false, and a YAML from TRL's GRPO documentation training on tiny unchanged."""

import json
import textwrap

import pytest

from common.config_keys import TRL_INSTEAD, resolve_keys
from common.errors import UserError
from common.flags import parse_flags
from grpo.config import GRPOConfig
from sft.config import SFTConfig

# TRL's vLLM-integration GRPO example (huggingface.co/docs/trl, "vllm_integration"), its GRPOConfig as YAML,
# with the `trl grpo` script's model and dataset keys: the model is the built-in tiny one, the data the
# offline synthetic problems, and max_completion_length 1024 -> 24 so the test takes seconds.
TRL_DOCS_YAML = """\
model_name_or_path: tiny
dataset_name: synthetic
output_dir: {out}
logging_steps: 1
use_vllm: true
vllm_mode: colocate
vllm_tensor_parallel_size: 1
vllm_gpu_memory_utilization: 0.3
max_prompt_length: 512
max_completion_length: 24
max_steps: 2
num_generations: 4
num_train_epochs: 1
per_device_train_batch_size: 4
push_to_hub: false
report_to: null
reward_funcs: [trl_docs_reward.reward_len]
"""
# ... and its reward, as the docs define it
TRL_DOCS_REWARD = """\
def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]
"""


def test_a_yaml_from_trls_grpo_docs_and_its_reward_train_two_steps_on_tiny(tmp_path, monkeypatch, capsys):
    import train_grpo

    (tmp_path / "trl_docs_reward.py").write_text(TRL_DOCS_REWARD)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "Qwen2-0.5B-GRPO"
    (tmp_path / "grpo.yaml").write_text(TRL_DOCS_YAML.format(out=out))
    train_grpo.main(["--config", str(tmp_path / "grpo.yaml")])
    printed = capsys.readouterr().out
    assert "prompts per step: per_device_train_batch_size 4 x gradient_accumulation_steps 1 x 1 process / " \
           "num_generations 4 = 1" in printed
    for key in ("use_vllm", "vllm_mode", "vllm_tensor_parallel_size", "vllm_gpu_memory_utilization", "logging_steps"):
        assert sum(line.startswith(f"note: {tmp_path / 'grpo.yaml'}: {key}: ") for line in printed.splitlines()) == 1
    log = [json.loads(x) for x in (out / "grpo_training_logs.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2] and all("reward_reward_len_mean" in x for x in log)
    assert all(x["reward_mean"] <= 0 for x in log)  # -|20 - len|: the docs' reward was what trained
    config = json.loads((out / "run_config.json").read_text())
    assert (config["prompts_per_step"], config["num_generations"], config["micro_batch_size"]) == (1, 4, 4)
    assert config["reward"] == ["trl_docs_reward:reward_len"] and config["report_to"] == []


def test_trl_keys_map_onto_ours_and_the_batch_arithmetic_is_printed(tmp_path, capsys):
    path = tmp_path / "trl.yaml"
    path.write_text(textwrap.dedent("""\
        output_dir: runs/x
        per_device_train_batch_size: 8
        gradient_accumulation_steps: 3
        num_generations: 6
        learning_rate: 1.0e-6
        lr_scheduler_type: constant_with_warmup
        scale_rewards: false
        log_completions: true
        bf16: true
        save_steps: 25
        use_peft: true
        lora_r: 8
        max_steps: -1
        num_train_epochs: 2
        top_k: null
        report_to: [tensorboard]
        push_to_hub: true
        hub_model_id: me/model
        chat_template_kwargs: {enable_thinking: true}
        gradient_checkpointing: true
        """))
    cfg = parse_flags(GRPOConfig, ["--config", str(path)], None)[0]
    assert (cfg.grpo_output, cfg.micro_batch_size, cfg.num_generations, cfg.prompts_per_step) == ("runs/x", 8, 6, 4)
    assert (cfg.lr_decay, cfg.scale_rewards, cfg.log_completions, cfg.save_every) == ("constant", "none", "all", 25)
    assert (cfg.finetune, cfg.lora_r, cfg.max_steps, cfg.num_epochs, cfg.top_k) == ("lora", 8, None, 2.0, 0)
    assert (cfg.report_to, cfg.push_to_hub, cfg.gradient_checkpointing) == (("tensorboard",), "me/model", True)
    assert json.loads(cfg.chat_template_kwargs) == {"enable_thinking": True}
    printed = capsys.readouterr().out.splitlines()
    assert f"note: {path}: prompts per step: per_device_train_batch_size 8 x gradient_accumulation_steps 3 x " \
           "1 process / num_generations 6 = 4 (--prompts_per_step 4 --num_generations 6 --micro_batch_size 8)" \
           in printed
    assert f"note: {path}: bf16: {TRL_INSTEAD['bf16']}" in printed
    # the processes count: under torchrun, WORLD_SIZE of them share the step's completions
    assert resolve_keys({"per_device_train_batch_size": 8, "num_generations": 16},
                        {"prompts_per_step": ("--prompts_per_step", 4)}, processes=4).values["prompts_per_step"] == 2
    # the `trl grpo` script's dataset keys: a configuration and the splits
    trl_data = tmp_path / "data.yaml"
    trl_data.write_text("dataset_name: openai/gsm8k\ndataset_config: main\ndataset_train_split: train\n"
                        "dataset_test_split: validation\n")
    cfg = parse_flags(GRPOConfig, ["--config", str(trl_data)], None)[0]
    assert (cfg.dataset, cfg.train_split, cfg.test_split) == ("openai/gsm8k:main", "train", "validation")
    sft = tmp_path / "sft.yaml"
    sft.write_text("output_dir: runs/s\nper_device_train_batch_size: 16\ngradient_accumulation_steps: 2\n")
    cfg = parse_flags(SFTConfig, ["--config", str(sft)], None)[0]
    assert (cfg.sft_output, cfg.batch_size, cfg.grad_accum) == ("runs/s", 16, 2)


BAD_CONFIGS = [  # (the config class, the file's text, what its error line says after the file's name)
    (SFTConfig, "max_stepz: 3\n", r"unknown key 'max_stepz'"),
    (SFTConfig, "max_steps: 0\n", r"--max_steps must be >= 1 \(got 0\)"),
    (SFTConfig, "max_steps: many\n", r"max_steps must be a whole number \(got 'many'\)"),
    (SFTConfig, "resume: maybe\n", r"resume must be true or false"),
    (SFTConfig, "- a list\n", r"expected a mapping"),
    (SFTConfig, "key: [unclosed\n", r"not valid YAML"),
    # TRL's keys that cannot apply here
    (GRPOConfig, "per_device_train_batch_size: 6\nnum_generations: 4\n",
     r"\(6\) must be a multiple of num_generations \(4\)"),
    (GRPOConfig, "push_to_hub: true\n", r"push_to_hub: true needs hub_model_id"),
    (GRPOConfig, "warmup_steps: 10\n", r"warmup_steps needs max_steps"),
    (GRPOConfig, "per_device_train_batch_sizes: 4\n", r"unknown key 'per_device_train_batch_sizes'"),
]


@pytest.mark.parametrize("cls,text,message", BAD_CONFIGS)
def test_a_bad_config_file_is_one_line_naming_the_file_and_key(tmp_path, cls, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=rf"^--config {path}: .*{message}"):
        parse_flags(cls, ["--config", str(path)], None)


def test_a_config_file_takes_every_key_as_help_spells_it(tmp_path):
    """`no_progress: true` (the --help spelling) is `show_progress: false` (the field's name)."""
    for text, expected in (("no_progress: true\nno_skip_zero_advantage: true\n", (False, False)),
                           ("no_progress: false\n", (True, True)),
                           ("show_progress: false\nskip_zero_advantage: false\n", (False, False))):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        cfg = parse_flags(GRPOConfig, ["--config", str(path)], None)[0]
        assert (cfg.show_progress, cfg.skip_zero_advantage) == expected, text


def test_a_switch_takes_true_or_false_on_the_command_line():
    assert parse_flags(GRPOConfig, ["--gradient_checkpointing", "True"], None)[0].gradient_checkpointing is True
    assert parse_flags(GRPOConfig, ["--gradient_checkpointing", "false"], None)[0].gradient_checkpointing is False
    assert parse_flags(GRPOConfig, ["--gradient_checkpointing"], None)[0].gradient_checkpointing is True
    assert parse_flags(GRPOConfig, ["--no_progress", "true"], None)[0].show_progress is False
    assert parse_flags(GRPOConfig, ["--no_progress", "False"], None)[0].show_progress is True
    cfg = parse_flags(SFTConfig, ["--overwrite", "--max_steps", "3"], None)[0]  # a bare switch, then a flag
    assert cfg.overwrite is True and cfg.max_steps == 3
    with pytest.raises(UserError, match=r"^--resume takes true or false, or nothing \(got 'maybe'\)$"):
        parse_flags(SFTConfig, ["--resume", "maybe"], None)


def test_trls_importance_sampling_keys_become_the_rollout_correction(tmp_path, capsys):
    """TRL corrects vLLM's sampler drift by default (sequence_mask, clip_max 3.0); its keys, or use_vllm,
    set --rollout_correction here instead of being dropped as 'no vLLM'."""
    cases = [("use_vllm: true\n", "sequence_mask", 3.0),
             ("vllm_importance_sampling_mode: token_truncate\nvllm_importance_sampling_clip_max: 2.5\n",
              "token_truncate", 2.5),
             ("vllm_importance_sampling_correction: false\n", "none", 2.0),
             ("use_vllm: false\n", "none", 2.0)]
    for text, mode, cap in cases:
        path = tmp_path / "trl.yaml"
        path.write_text(text)
        cfg = parse_flags(GRPOConfig, ["--config", str(path)], None)[0]
        assert (cfg.rollout_correction, cfg.rollout_correction_cap) == (mode, cap), text
    path.write_text("vllm_importance_sampling_clip_min: 0.5\n")
    parse_flags(GRPOConfig, ["--config", str(path)], None)
    assert "no lower bound here" in capsys.readouterr().out
