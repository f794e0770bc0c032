"""torchrun data parallelism on the CPU (gloo, 2 processes): the same update as one process, and the
CLIs leave one log, one checkpoint and one model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def weights(run: Path, lora: bool) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors" if lora else run / "model.safetensors"))


def test_dist_helpers_are_no_ops_in_one_process():
    import torch

    from common.distributed import current

    dist = current()
    assert (dist.rank, dist.world_size, dist.enabled, dist.is_main) == (0, 1, False, True)
    x = torch.tensor([1.0, 2.0])
    assert dist.all_reduce(x) is x and dist.all_gather(x) is x and dist.gather_objects(7) == [7]


def test_prompt_shards_cover_the_step_in_order():
    from grpo.prompt_order import step_prompts as _prompt_indices

    whole, epoch = _prompt_indices(5, 50, 8, seed=1)
    shards = [_prompt_indices(5, 50, 8, seed=1, rank=r, world_size=2) for r in range(2)]
    assert shards[0][0] + shards[1][0] == whole and shards[0][1] == epoch
    assert len(shards[0][0]) == 4


@pytest.mark.slow  # the quick suite stays under 5 minutes; CI runs it
def test_two_ranks_make_the_single_process_update(tmp_path):
    """2 ranks x 2 prompts == 1 rank x 4 prompts on the same completions: dapo and grpo, full and LoRA,
    the loss projecting DDP's hidden states itself, a rollout correction (token_mask, sequence_truncate)
    against stand-in sampler log-probs in two of the cases."""
    import torch

    from tests.ddp_grpo_worker import CASES, G, run_case

    torchrun("tests/ddp_grpo_worker.py", str(tmp_path / "ddp"))
    for rank in range(2):  # under DDP too the loss projects the hidden states itself: no [B, C, V] logits
        paths = json.loads((tmp_path / "ddp" / f"paths_{rank}.json").read_text())
        assert len(paths) >= len(CASES) and all(paths), paths
    start = weights_of_tiny()
    for name, case in CASES.items():
        run_case(tmp_path / "single" / name, **case)
        single = weights(tmp_path / "single" / name, case["finetune"] == "lora")
        ddp = weights(tmp_path / "ddp" / name, case["finetune"] == "lora")
        assert single.keys() == ddp.keys()
        diffs = torch.cat([(single[k].float() - ddp[k].float()).abs().flatten() for k in single])
        print(f"{name}: largest weight difference 1 vs 2 ranks {diffs.max().item():.2e}, "
              f"{(diffs > 1e-6).sum().item()} of {diffs.numel()} above 1e-6")
        # AdamW's first step moves a weight by lr * g / (|g| + eps): where |g| is near eps (1e-8) float
        # summation order shows, so a handful of weights differ by up to a few % of lr (1e-3); all others agree.
        assert diffs.max().item() < 1e-4, name
        assert (diffs > 1e-6).float().mean().item() < 1e-4, name
        if case["finetune"] == "lora":  # lora_B starts at zero: the step moved it
            moved = max(single[k].abs().max().item() for k in single if "lora_B" in k)
        else:
            moved = max((single[k].float() - start[k].float()).abs().max().item() for k in single)
        assert moved > 1e-4, f"{name}: the step did not change the weights, so the comparison proves nothing"
        log, one = ([json.loads(x) for x in (tmp_path / d / name / "grpo_training_logs.jsonl").read_text().splitlines()]
                    for d in ("ddp", "single"))
        assert len(log) == 1 and log[0]["world_size"] == 2
        for key in ("reward_mean", "reward_std", "adv_std", "tokens_generated", "grpo_loss", "kl", "entropy",
                    "sampler_kl", "sampler_logp_diff_mean", "sampler_logp_diff_max", "sampler_ratio_min",
                    "sampler_ratio_max", "rollout_correction_masked_tokens", "rollout_correction_truncated_tokens"):
            assert log[0][key] == pytest.approx(one[0][key], rel=1e-4, abs=1e-6), key
        if case["rollout_correction"] != "none":  # the stand-in sampler's ratios over the cap were acted on
            acted = log[0]["rollout_correction_masked_tokens"] + log[0]["rollout_correction_truncated_tokens"]
            assert acted > 0 and log[0]["sampler_ratio_max"] > 2, name
        # completions.jsonl: both ranks' completions, each once, as the single process writes them
        rows, single_rows = ([json.loads(x) for x in (tmp_path / d / name / "completions.jsonl").read_text()
                              .splitlines()] for d in ("ddp", "single"))
        assert len(rows) == 4 * G and [(r["question"], r["completion"], r["trained"]) for r in rows] == \
            [(r["question"], r["completion"], r["trained"]) for r in single_rows]
        assert [r["advantage"] for r in rows] == pytest.approx([r["advantage"] for r in single_rows], abs=1e-6)
        torch.testing.assert_close(log[0]["grad_norm"], one[0]["grad_norm"], rtol=1e-4, atol=1e-6)


def weights_of_tiny() -> dict:
    from safetensors.torch import load_file

    from models.tiny import tiny_dir

    return load_file(str(tiny_dir() / "model.safetensors"))


@pytest.mark.slow  # 20-25 s: two processes under torchrun, end to end (the 2-rank update test stays quick)
def test_torchrun_grpo_cli_writes_one_log_one_checkpoint_one_model(tmp_path):
    out = tmp_path / "grpo"
    torchrun("train_grpo.py", "--model_name", "tiny", "--dataset", "synthetic", "--max_steps", "3",
             "--max_completion_length", "24", "--grpo_output", str(out), "--no_progress")
    lines = [json.loads(x) for x in (out / "grpo_training_logs.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert all(x["world_size"] == 2 for x in lines)
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["world_size"] == 2
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    # --resume with the same world size continues the log: one more line, no duplicates
    torchrun("train_grpo.py", "--model_name", "tiny", "--dataset", "synthetic", "--max_steps", "4",
             "--max_completion_length", "24", "--grpo_output", str(out), "--no_progress", "--resume")
    lines = [json.loads(x) for x in (out / "grpo_training_logs.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    # the checkpoint resumes only with the world size that wrote it
    from common.errors import UserError
    from grpo.trainer import GRPOConfig, train_grpo

    with pytest.raises(UserError, match="written by 2 process"):
        train_grpo(GRPOConfig(model_name="tiny", dataset="synthetic", max_steps=5, grpo_output=str(out),
                              max_completion_length=24, resume=True, device="cpu", show_progress=False))


@pytest.mark.slow  # 10-12 s: two processes under torchrun, end to end
def test_torchrun_sft_cli_leaves_one_log_one_checkpoint_one_model(tmp_path):
    out = tmp_path / "sft"
    torchrun("train_sft.py", "--model_name", "tiny", "--dataset", "synthetic", "--max_steps", "3",
             "--batch_size", "8", "--eval_samples", "8", "--eval_max_new_tokens", "16", "--sft_output", str(out),
             "--no_progress")
    lines = [json.loads(x) for x in (out / "sft_training_logs.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text()) == {
        "step": 3, "total_steps": 3, "world_size": 2}


@pytest.mark.slow
def test_sharded_eval_equals_one_process(tmp_path, sft_tiny):
    """On a model that answers some problems right (the shared SFT), so a wrong tally would show."""
    model_dir, _ = sft_tiny
    args = ["-m", "eval", "--model", str(model_dir), "--dataset", "synthetic", "--max_samples", "30",
            "--max_new_tokens", "40", "--batch_size", "8", "--device", "cpu", "--no_progress"]
    torchrun(*args, "--output", str(tmp_path / "two"))
    torchrun(*args, "--output", str(tmp_path / "one"), nproc=1)
    two = json.loads((tmp_path / "two" / "eval_summary.json").read_text())
    one = json.loads((tmp_path / "one" / "eval_summary.json").read_text())
    assert two["world_size"] == 2 and two["num_questions"] == 30
    assert two["accuracy"] == one["accuracy"] > 0
    preds = [(tmp_path / d / "eval_predictions.jsonl").read_text().splitlines() for d in ("two", "one")]
    assert [json.loads(x)["completion"] for x in preds[0]] == [json.loads(x)["completion"] for x in preds[1]]


def test_prompts_per_step_must_split_across_ranks(tmp_path):
    from common.distributed import Dist
    from common.errors import UserError
    from grpo.trainer import GRPOConfig, _validate

    with pytest.raises(UserError, match="multiple of 2"):
        _validate(GRPOConfig(prompts_per_step=3), Dist(0, 2, 0), "cpu")
    with pytest.raises(UserError, match="needs CUDA"):
        _validate(GRPOConfig(finetune="lora", use_4bit=True), Dist(0, 2, 0), "cpu")
    _validate(GRPOConfig(prompts_per_step=4), Dist(0, 2, 0), "cpu")


def test_nccl_on_cpu_is_a_one_line_error():
    from common.distributed import _pick_device_and_backend
    from common.errors import UserError

    with pytest.raises(UserError, match="nccl needs CUDA"):
        _pick_device_and_backend("cpu", "nccl", 0)
    assert _pick_device_and_backend("cpu", "auto", 1) == ("cpu", "gloo")


def test_a_cuda_device_without_torchrun_becomes_the_current_device(monkeypatch):
    """--device cuda:1 alone: graph capture, synchronize and peak-memory calls act on the current CUDA
    device, so it is set once at the start (here a stand-in records it)."""
    import torch

    from common.distributed import distributed_run

    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(d))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for device in ("cuda:1", "cuda", "cpu"):
        with distributed_run(device) as (_, got):
            assert got == device
    assert chosen == ["cuda:1"]


def test_ddp_keeps_gradients_in_its_buckets_and_broadcasts_no_buffers(monkeypatch):
    import torch

    from common.distributed import Dist, wrap_ddp

    seen = {}
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda model, **kw: seen.update(kw) or model)
    wrap_ddp(torch.nn.Linear(2, 2), Dist(0, 2, 0), "cuda:0")
    assert seen == {"device_ids": [0], "gradient_as_bucket_view": True, "broadcast_buffers": False}
