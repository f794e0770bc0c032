"""The same command on the same machine gives the same numbers: two processes run the same short SFT, then
two run the same short GRPO from it, and their weights and logs must be equal to the bit (only what is
measured, times, rates, memory, timestamps, may differ). Each pair runs side by side, so a result that
depends on timing, thread scheduling or the process (hash seeds, addresses) shows as a difference."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.run_files import is_measured
from tests.conftest import ROOT

SFT = ["train_sft.py", "--model_name", "tiny", "--dataset", "synthetic", "--max_steps", "8", "--batch_size", "16",
       "--finetune", "full", "--learning_rate", "1e-3", "--eval_samples", "16", "--eval_max_new_tokens", "24",
       "--no_progress", "--device", "cpu"]
GRPO = ["train_grpo.py", "--dataset", "synthetic", "--max_steps", "2", "--prompts_per_step", "4",
        "--num_generations", "4", "--micro_batch_size", "8", "--max_completion_length", "24", "--beta", "0.04",
        "--learning_rate", "1e-4", "--eval_every", "2", "--eval_samples", "8", "--no_progress", "--device", "cpu",
        "--reward", "numeric", "--reward", "lengths:shorter"]  # lengths differ, so every group has a signal
# Each run: the SFT CLI, then the GRPO CLI from its model, in one process (one import of the libraries)
DRIVER = "import json, sys; import train_sft, train_grpo; a = json.loads(sys.argv[1]); train_sft.main(a[0]); " \
         "train_grpo.main(a[1])"
LENGTHS = "def shorter(completions, **kwargs):\n    return [-len(c) / 100 for c in completions]\n"


def run_twice(args_of, path: Path) -> None:
    """Start both runs at once (in separate processes with different hash seeds), wait for both."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(path), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, *args_of(i)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**env, "PYTHONHASHSEED": str(i + 1)})
             for i in range(2)]
    for p in procs:
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, out[-3000:]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def computed(log: Path) -> list[dict]:
    """Every log line without its measured fields."""
    return [{k: v for k, v in json.loads(line).items() if not is_measured(k)} for line in log.read_text().splitlines()]


@pytest.mark.slow  # the quick suite stays under 5 minutes; CI runs it
def test_the_same_sft_and_grpo_twice_give_identical_weights_and_logs(tmp_path):
    (tmp_path / "lengths.py").write_text(LENGTHS)
    sft = [tmp_path / f"sft{i}" for i in range(2)]
    grpo = [tmp_path / f"grpo{i}" for i in range(2)]
    run_twice(lambda i: ["-c", DRIVER, json.dumps([SFT[1:] + ["--sft_output", str(sft[i])],
                                                   GRPO[1:] + ["--model_name", str(sft[i]), "--grpo_output",
                                                               str(grpo[i])]])], tmp_path)

    for a, b, log in ((*sft, "sft_training_logs.jsonl"), (*grpo, "grpo_training_logs.jsonl")):
        assert digest(a / "model.safetensors") == digest(b / "model.safetensors"), (a, b)
        lines = computed(a / log)
        assert lines == computed(b / log)
        assert any("eval_accuracy" in x for x in lines)  # the evals ran and were compared too
    # the runs trained: GRPO moved the SFT weights, which moved tiny's
    assert digest(grpo[0] / "model.safetensors") != digest(sft[0] / "model.safetensors")
    grpo_log = computed(grpo[0] / "grpo_training_logs.jsonl")
    assert all(x["kl_loss"] >= 0 for x in grpo_log if "kl_loss" in x) and len(grpo_log) == 3


def test_measured_fields_are_only_times_rates_memory_and_timestamps():
    measured = ["timestamp_iso", "time_per_step_s", "generation_time_s", "tokens_per_s", "rollout_tokens_per_s",
                "peak_memory_gb", "peak_memory_reserved_gb"]
    computed_fields = ["loss", "grpo_loss", "reward_mean", "eval_accuracy", "grad_norm", "learning_rate", "tokens",
                       "completion_length_mean", "clipped_ratio"]
    assert all(is_measured(k) for k in measured)
    assert not any(is_measured(k) for k in computed_fields)
