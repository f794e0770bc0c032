"""A fixed set of short SFT and GRPO runs (LoRA and full, every loss type, a KL term, masked truncation,
dynamic sampling); prints `RESULT {json}`: each run's computed log fields (times, rates, memory left
out) and the sha256 of its saved weights. Run it before and after a change that must not change
behaviour, and compare the two lines:

    OMP_NUM_THREADS=1 .venv/bin/python dev/fixed_runs.py /tmp/before | grep ^RESULT > before.json
"""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import train_grpo  # noqa: E402
import train_sft  # noqa: E402
from common.run_files import is_measured  # noqa: E402

COMMON = ["--dataset", "synthetic", "--no_progress", "--device", "cpu"]
GRPO = ["--model_name", "{sft_full}", "--prompts_per_step", "4", "--num_generations", "4"]
LENGTHS = ["--reward", "lengths:shorter"]  # completion lengths differ, so groups carry a signal
RUNS = {
    "sft_lora": (train_sft, ["--model_name", "tiny", "--max_steps", "6", "--batch_size", "8", "--learning_rate",
                             "1e-3", "--eval_samples", "8", "--eval_max_new_tokens", "16"]),
    "sft_full": (train_sft, ["--model_name", "tiny", "--max_steps", "8", "--batch_size", "16", "--finetune", "full",
                             "--learning_rate", "1e-3", "--eval_samples", "16", "--eval_max_new_tokens", "24"]),
    "grpo_dapo": (train_grpo, GRPO + ["--max_steps", "3", "--micro_batch_size", "4", "--max_completion_length", "24",
                                      "--beta", "0.04", "--learning_rate", "1e-4", "--eval_every", "2",
                                      "--eval_samples", "8", "--reward", "numeric"] + LENGTHS),
    "grpo_lora_grpo": (train_grpo, GRPO + ["--max_steps", "3", "--micro_batch_size", "3", "--max_completion_length",
                                           "12", "--beta", "0", "--learning_rate", "1e-3", "--finetune", "lora",
                                           "--loss_type", "grpo", "--mask_truncated_completions", "--reward",
                                           "numeric"] + LENGTHS),
    "grpo_bnpo": (train_grpo, GRPO + ["--max_steps", "2", "--micro_batch_size", "5", "--max_completion_length", "16",
                                      "--beta", "0", "--learning_rate", "1e-4", "--loss_type", "bnpo",
                                      "--num_iterations", "2"] + LENGTHS),
    "grpo_dynamic": (train_grpo, GRPO + ["--max_steps", "2", "--micro_batch_size", "5", "--max_completion_length",
                                         "16", "--beta", "0", "--learning_rate", "1e-4", "--dynamic_sampling",
                                         "--max_extra_rollouts", "2"]),
    "grpo_drgrpo": (train_grpo, GRPO + ["--max_steps", "2", "--micro_batch_size", "4", "--max_completion_length",
                                        "16", "--beta", "0", "--learning_rate", "1e-4", "--loss_type",
                                        "dr_grpo"] + LENGTHS),
}


def main(out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "lengths.py").write_text("def shorter(completions, **kwargs):\n"
                                    "    return [-len(c) / 100 for c in completions]\n")
    sys.path.insert(0, str(out))
    result = {}
    for name, (module, args) in RUNS.items():
        args = [a.format(**{k: str(out / k) for k in RUNS}) for a in args]
        folder = "--sft_output" if module is train_sft else "--grpo_output"
        module.main(COMMON + args + [folder, str(out / name)])
        log = next((out / name).glob("*_training_logs.jsonl"))
        lines = [{k: v for k, v in json.loads(line).items() if not is_measured(k)}
                 for line in log.read_text().splitlines()]
        weights = hashlib.sha256((out / name / "model.safetensors").read_bytes()).hexdigest()
        result[name] = {"weights": weights, "log": lines}
    print("RESULT " + json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
