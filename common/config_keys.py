"""What a config file's keys mean: our field names, the flags as --help spells them, and TRL's keys.

`resolve_keys(data, cls)` turns a config file's mapping into our fields, in one pass over its keys:
- a field's own name (`show_progress: false`) is taken as it is;
- a flag's --help spelling (`no_progress: true`) sets its field (a `--no_X` flag's value turned over);
- a key of TRL's GRPOConfig/SFTConfig (and of the `trl grpo`/`trl sft` scripts' arguments) is mapped
  through TRL_KEYS: renamed (`output_dir`, `num_train_epochs`), its value converted (`scale_rewards: true`,
  `report_to: none`), or, with no counterpart here, one printed line saying what happens instead
  (`use_vllm`, `bf16`). TRL's batch keys become prompts per step, and the arithmetic is printed.
A key that is none of these is returned unknown for the caller's one-line error.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

from common.errors import fail

# TRL's defaults for its batch keys (GRPOConfig): a file that gives one of them means the others' too.
TRL_BATCH_DEFAULTS = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "num_generations": 8}

# TRL key -> our field, where only the name differs (the value goes through the field's type and range).
TRL_RENAMED = {
    "model_name_or_path": "model_name",
    "dataset_name": "dataset",
    "num_train_epochs": "num_epochs",
    "save_steps": "save_every",
    "load_in_4bit": "use_4bit",
    "overwrite_output_dir": "overwrite",
    "per_device_eval_batch_size": "eval_batch_size",
    "num_completions_to_print": "print_completions",
    "dataset_train_split": "train_split",
    "dataset_test_split": "test_split",
    "lr_scheduler_type": "lr_decay",  # its value through TRL_VALUES first
}

_COMPUTE = "compute runs under bf16 autocast on CUDA and in fp32 on the CPU, whatever this says"
_ENGINE = "the built-in rollout engine generates (sampling/; CUDA graphs on CUDA), no vLLM"
# TRL key -> what happens here instead (printed as one line when the file sets it).
TRL_INSTEAD = {
    "use_vllm": _ENGINE,
    "vllm_mode": _ENGINE,
    "bf16": _COMPUTE,
    "fp16": _COMPUTE,
    "tf32": _COMPUTE,
    "torch_dtype": "the model loads in fp32 (a bf16 base under LoRA on CUDA), its compute as bf16 autocast on CUDA",
    "dtype": "the model loads in fp32 (a bf16 base under LoRA on CUDA), its compute as bf16 autocast on CUDA",
    "attn_implementation": "attention is the model's own (SDPA)",
    "logging_steps": "every step is logged (the JSONL log and the trackers)",
    "logging_strategy": "every step is logged (the JSONL log and the trackers)",
    "logging_first_step": "every step is logged (the JSONL log and the trackers)",
    "log_level": "progress and notes go to the console; every step to the JSONL log",
    "save_strategy": "a checkpoint every --save_every steps and at the end",
    "save_total_limit": "one checkpoint is kept (the latest); --keep_snapshots limits the kept models",
    "save_only_model": "the checkpoint holds the model and the optimizer state, for --resume",
    "remove_unused_columns": "every column of the records reaches the rewards",
    "shuffle_dataset": "the prompts are shuffled by --seed",
    "dataloader_num_workers": "the records are read in the training process",
    "dataloader_pin_memory": "the records are read in the training process",
    "dataloader_drop_last": "every prompt is used; the last step may repeat prompts to fill its batch",
    "optim": "the optimizer is torch's AdamW (fused on CUDA)",
    "adam_beta1": "AdamW's beta1 is torch's default, 0.9",
    "adam_epsilon": "AdamW's epsilon is torch's default, 1e-8",
    "lora_target_modules": "LoRA adapts every attention and MLP projection (models/lora.py)",
    "lora_task_type": "LoRA adapts a causal LM",
    "use_liger_kernel": "the log-probs come from this project's chunked kernel (models/logprobs.py)",
    "gradient_checkpointing_kwargs": "--gradient_checkpointing uses the model's own (non-reentrant) recompute",
    "ddp_find_unused_parameters": "torchrun's DDP is set up by common/distributed.py",
    "model_init_kwargs": "the model loads as models/loading.py decides",
    "disable_dropout": "dropout is as the model's config sets it (Qwen3: none)",
    "sync_ref_model": "the reference model stays the starting model",
    "ds3_gather_for_generation": "no DeepSpeed: one model copy per process",
    "generation_batch_size": "one rollout of --prompts_per_step prompts per optimizer step (--num_iterations reuses "
                             "it)",
    "steps_per_generation": "one rollout of --prompts_per_step prompts per optimizer step (--num_iterations reuses "
                            "it)",
    "repetition_penalty": "sampling has no repetition penalty",
    "cache_implementation": "the rollout engine keeps its own KV cache",
    "eval_strategy": "with --eval_every N the held-out accuracy is scored every N steps",
    "evaluation_strategy": "with --eval_every N the held-out accuracy is scored every N steps",
    "hub_strategy": "the final model is uploaded once, at the end",
    "hub_private_repo": "the hub repository is created as the hub's default (public)",
    "packing": "one example per row, no packing",
    "completion_only_loss": "SFT's loss is on the target (solution) tokens only",
    "assistant_only_loss": "SFT's loss is on the target (solution) tokens only",
    "dataset_text_field": "SFT's targets are --solution_field (the prompt built from --question_field)",
    "accelerate_config": "several GPUs run under torchrun (docs/training.md)",
    "num_processes": "the number of processes is torchrun's --nproc_per_node",
    "use_cpu": "--device cpu chooses the CPU",
}


def _report_to(value: Any) -> Any:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if v not in ("none", None)]


def _bool_or(mapping: dict[bool, Any]) -> Callable[[Any], Any]:
    return lambda v: mapping[v] if isinstance(v, bool) else v


# TRL key of the same name as ours whose TRL value needs converting first (None: leave the field alone).
TRL_VALUES: dict[str, Callable[[Any], Any]] = {
    "max_steps": lambda v: None if v == -1 else v,
    "top_k": lambda v: 0 if v is None else v,
    "min_p": lambda v: 0.0 if v is None else v,
    "scale_rewards": _bool_or({True: "group", False: "none"}),
    "log_completions": _bool_or({True: "all", False: "0"}),
    "report_to": _report_to,
    "chat_template_kwargs": lambda v: json.dumps(v) if isinstance(v, dict) else v,
    "lr_scheduler_type": lambda v: {"constant_with_warmup": "constant", "cosine_with_min_lr": "cosine"}.get(v, v),
}


def _reward_spec(name: Any) -> Any:
    """A `trl grpo --reward_funcs` entry as our --reward: TRL's accuracy_reward is `math_verify`; a dotted
    path `pkg.module.function` is `pkg.module:function`."""
    if not isinstance(name, str) or ":" in name:
        return name
    if name == "accuracy_reward":
        return "math_verify"
    module, _, fn = name.rpartition(".")
    return f"{module}:{fn}" if module else name


@dataclasses.dataclass
class Resolved:
    """What a config file's keys resolved to: our fields' values (still as the file wrote them), the
    keys that are nothing known, and the lines to print."""

    values: dict[str, Any]
    unknown: list[str]
    notes: list[str]


def resolve_keys(data: dict[str, Any], fields: dict[str, tuple[str, Any]], processes: int | None = None) -> Resolved:
    """`data` (a config file's mapping) as our fields. `fields`: each field's name -> (its flag's --help
    spelling, its default); `processes`: torchrun's WORLD_SIZE unless given (TRL's batch arithmetic)."""
    spelled = {flag.lstrip("-"): name for name, (flag, _) in fields.items()}
    out: dict[str, Any] = {}
    unknown, notes = [], []

    def put(key: str, name: str, value: Any) -> None:  # a TRL key that maps onto `name`
        if name not in fields:
            notes.append(f"{key}: no counterpart in this trainer, left out")
            return
        out[name] = value

    for key, value in data.items():
        if key == "push_to_hub" and isinstance(value, bool):
            continue  # TRL's switch, with hub_model_id: below
        if key in TRL_VALUES:
            value = TRL_VALUES[key](value)
        if key in fields:
            out[key] = value
        elif key in spelled:  # `no_progress: true` is `show_progress: false`
            name = spelled[key]
            flips = isinstance(value, bool) and fields[name][1] is True
            out[name] = (not value) if flips else value
        elif key in TRL_RENAMED:
            put(key, TRL_RENAMED[key], value)
        elif key.startswith(TRL_IS):
            continue  # below: TRL's importance-sampling correction is our --rollout_correction
        elif key in TRL_INSTEAD or key.startswith("vllm_"):
            notes.append(f"{key}: {TRL_INSTEAD.get(key, _ENGINE)}")
        elif key in ("per_device_train_batch_size", "gradient_accumulation_steps", "output_dir", "use_peft",
                     "push_to_hub", "hub_model_id", "resume_from_checkpoint", "warmup_steps", "reward_funcs",
                     "dataset_config", "disable_tqdm", "eval_steps"):
            continue  # below: they depend on each other or on the trainer
        else:
            unknown.append(key)
    _trl_combined(data, fields, out, notes, int(os.environ.get("WORLD_SIZE", "1")) if processes is None else processes)
    return Resolved(out, unknown, notes)


TRL_IS = "vllm_importance_sampling_"


def _trl_correction(data: dict[str, Any], fields: dict[str, Any], out: dict[str, Any], notes: list[str]) -> None:
    """TRL's correction of the gap between vLLM's sampler and the trained policy, as --rollout_correction
    (our engine is a second implementation too): TRL corrects by default when it generates with vLLM
    (sequence_mask, clip_max 3.0); its keys, or use_vllm: true, bring that here."""
    keys = {k[len(TRL_IS):]: v for k, v in data.items() if k.startswith(TRL_IS)}
    if "rollout_correction" not in fields or not (keys or data.get("use_vllm") is True):
        return
    if keys.get("correction", True) is False:
        out["rollout_correction"] = "none"
    else:
        out["rollout_correction"] = keys.get("mode", "sequence_mask")
        cap = keys.get("clip_max", keys.get("cap", 3.0))
        if cap is not None:
            out["rollout_correction_cap"] = cap
    if keys.get("clip_min") is not None:
        notes.append(f"{TRL_IS}clip_min: no lower bound here (--rollout_correction masks or truncates above the "
                     f"cap only)")
    notes.append(f"TRL's importance-sampling correction: --rollout_correction {out['rollout_correction']}"
                 + (f" --rollout_correction_cap {out['rollout_correction_cap']}" if "rollout_correction_cap" in out
                    else ""))


def _trl_combined(data: dict[str, Any], fields: dict[str, Any], out: dict[str, Any], notes: list[str],
                  processes: int) -> None:
    """The TRL keys whose meaning here takes more than a rename."""
    _trl_correction(data, fields, out, notes)
    output = next((f for f in ("grpo_output", "sft_output") if f in fields), None)
    if "output_dir" in data and output:
        out[output] = data["output_dir"]
    if "per_device_train_batch_size" in data or "gradient_accumulation_steps" in data:
        b = {k: data.get(k, default) for k, default in TRL_BATCH_DEFAULTS.items()}
        if "prompts_per_step" in fields:  # GRPO: completions per step over all processes, in groups
            completions = b["per_device_train_batch_size"] * b["gradient_accumulation_steps"] * processes
            if not all(isinstance(v, int) and v >= 1 for v in b.values()) or completions % b["num_generations"]:
                fail(f"per_device_train_batch_size x gradient_accumulation_steps x processes ({completions}) must be "
                     f"a multiple of num_generations ({b['num_generations']}), as in TRL")
            out["micro_batch_size"] = b["per_device_train_batch_size"]
            out["num_generations"] = b["num_generations"]
            out["prompts_per_step"] = completions // b["num_generations"]
            notes.append(f"prompts per step: per_device_train_batch_size {b['per_device_train_batch_size']} x "
                         f"gradient_accumulation_steps {b['gradient_accumulation_steps']} x {processes} process"
                         f"{'es' if processes != 1 else ''} / num_generations {b['num_generations']} = "
                         f"{out['prompts_per_step']} (--prompts_per_step {out['prompts_per_step']} --num_generations "
                         f"{b['num_generations']} --micro_batch_size {b['per_device_train_batch_size']})")
        else:  # SFT: examples per micro-batch, micro-batches per step
            out["batch_size"] = b["per_device_train_batch_size"]
            out["grad_accum"] = b["gradient_accumulation_steps"]
    if data.get("use_peft") is True:
        out["finetune"] = "lora"
    if data.get("disable_tqdm") is True:
        out["show_progress"] = False
    if data.get("resume_from_checkpoint"):
        out["resume"] = True
        notes.append(f"resume_from_checkpoint: the run continues from the checkpoint in --{output}")
    if data.get("push_to_hub") is True:
        if not data.get("hub_model_id"):
            fail("push_to_hub: true needs hub_model_id: NAMESPACE/NAME (the hub repository to upload to)")
        out["push_to_hub"] = data["hub_model_id"]
    elif "hub_model_id" in data:
        notes.append("hub_model_id: nothing is uploaded without push_to_hub: true")
    if data.get("warmup_steps"):
        steps = out.get("max_steps")
        if not isinstance(steps, int):
            fail("warmup_steps needs max_steps (here the warmup is a share of the steps: warmup_ratio)")
        out["warmup_ratio"] = min(1.0, data["warmup_steps"] / steps)
        notes.append(f"warmup_steps {data['warmup_steps']} of max_steps {steps}: "
                     f"--warmup_ratio {out['warmup_ratio']:g}")
    if data.get("eval_steps") and "eval_every" in fields and data.get("eval_strategy", "steps") == "steps":
        out["eval_every"] = data["eval_steps"]
    if "reward_funcs" in data:
        funcs = data["reward_funcs"] if isinstance(data["reward_funcs"], list) else [data["reward_funcs"]]
        if "reward" in fields:
            out["reward"] = [_reward_spec(f) for f in funcs]
        else:
            notes.append("reward_funcs: no counterpart in this trainer, left out")
    if data.get("dataset_config"):
        out["dataset"] = f"{out.get('dataset', 'gsm8k')}:{data['dataset_config']}"
