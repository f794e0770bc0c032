"""The benchmarks run and print their figures (the figures themselves are reported, not asserted)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT


def run_json(args, lines=1):
    """(stdout, the last JSON line) of a benchmark run that prints `lines` JSON lines: `args` starts with
    a module (`benchmarks.step`) or a script's path (`dev/continuous.py`)."""
    how = [] if args[0].endswith(".py") else ["-m"]
    result = subprocess.run([sys.executable, *how, *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    found = [x for x in result.stdout.splitlines() if x.startswith("JSON ")]
    assert len(found) == lines, result.stdout
    return result.stdout, json.loads(found[-1][5:])


@pytest.mark.slow  # the quick suite stays under 5 minutes; CI runs it
@pytest.mark.parametrize("lora", [False, True])
def test_rollout_benchmark(lora):
    extra = ["--lora", "--dtype", "bfloat16"] if lora else []  # both sides' model in bf16 (CPUs with bf16 products)
    out, record = run_json(["benchmarks.rollout", "--model", "tiny", "--prompts", "2", "--num_generations", "2",
                            "--max_new_tokens", "8", "--repeats", "1", "--device", "cpu", *extra])
    assert "speedup" in out and record["lora"] is lora
    assert record["dtype"] == ("bfloat16" if lora else "float32")
    assert record["ours_tokens_per_s"] > 0 and record["generate_tokens_per_s"] > 0
    assert abs(record["speedup"] - record["ours_tokens_per_s"] / record["generate_tokens_per_s"]) <= 0.01


@pytest.mark.slow  # 10-16 s: a benchmark CLI end to end, in several processes
def test_step_benchmark():
    out, record = run_json(["benchmarks.step", "--model", "tiny", "--max_new_tokens", "8", "--steps", "2",
                            "--warmup", "1", "--device", "cpu"], lines=2)
    # the timed figures come out (flushed) before the floor study starts, then again with the floor's
    first = json.loads(out.split("JSON ", 1)[1].splitlines()[0])
    assert out.index("JSON ") < out.index("floor:") and "floor_s" not in first
    assert {k: record[k] for k in first} == first
    assert record["completions_per_step"] == 16 and record["micro_batch_size"] == 4 and record["steps"] == 2
    for key in ("median_time_per_step_s", "median_generation_time_s", "median_reference_time_s",
                "median_backward_time_s", "median_optimizer_time_s", "peak_memory_gb",
                "median_rollout_tokens_per_s"):
        assert record[key] > 0, key
    assert record["processes"] == 1 and record["prompt_len_max"] >= record["prompt_len_mean"] > 10
    assert "forward+backward" in out and "PYTORCH_CUDA_ALLOC_CONF" in out
    # the floor: a second run drew the same completions, its products were timed, and only the
    # phases that multiply matrices have one
    assert record["floor_steps_matched"] is True and "floor:" in out
    assert record["matmul_gflop_per_step"] > 0 and 0 < record["floor_s"]
    assert record["floor_share"] == pytest.approx(record["floor_s"] / record["median_time_per_step_s"], abs=2e-3)
    for phase in ("generation", "reference", "backward"):
        assert record[f"floor_{phase}_s"] > 0, phase
    assert record["floor_optimizer_s"] == 0.0


def test_step_benchmark_writes_no_model_and_no_checkpoint(monkeypatch, capsys):
    """A benchmark's figures never wait on (or die in) ~10 GB of saving: nothing is saved at all."""
    import transformers

    import benchmarks.step

    writes = []
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", lambda *a, **k: writes.append("model"))
    monkeypatch.setattr(torch, "save", lambda *a, **k: writes.append("torch.save"))
    benchmarks.step.main(["--model", "tiny", "--max_new_tokens", "4", "--steps", "1", "--warmup", "0", "--device",
                          "cpu", "--no_floor"])
    assert writes == [] and '"benchmark": "step"' in capsys.readouterr().out


def test_matmul_counter_counts_each_product_by_step_and_phase():
    from benchmarks.floor import MatmulCounter, floor, tagged_phases
    from common.timing import Timer

    counter, timer = MatmulCounter(), Timer("cpu")
    x, w = torch.randn(4, 8), torch.randn(16, 8)
    q, k, v = (torch.randn(1, 2, 5, 4, requires_grad=True) for _ in range(3))
    x @ w.T  # outside any phase: not counted
    with tagged_phases(counter):
        with timer("generation"):
            x @ w.T  # 2 * 4 * 8 * 16 = 1,024 FLOPs
            torch.bmm(torch.randn(3, 4, 8), torch.randn(3, 8, 2))  # 2 * 3 * 4 * 8 * 2 = 384
            x + 1.0  # not a product
        with timer("optimizer"):
            pass
        with timer("backward"):  # step 1: attention forward (2 products) and backward (5 products)
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    assert counter.step == 1 and counter.phase is None
    assert Timer.__call__.__name__ == "__call__"  # the Timer is itself again
    by_step_phase = {}
    for (step, phase, sig), n in counter.counts.items():
        by_step_phase[step, phase] = by_step_phase.get((step, phase), 0) + n * counter.flops[sig]
    assert by_step_phase == {(0, "generation"): 1024 + 384, (1, "backward"): 2 * 2 * 5 * 5 * 4 * (2 + 5)}
    result = floor(counter, range(2))
    assert result["phases"]["generation"]["gflop"] == pytest.approx((1024 + 384) / 1e9 / 2)
    assert result["timed_share_of_flops"] == 1.0 and result["timed_shapes"] == 4
    assert all(p["floor_s"] > 0 for p in result["phases"].values())
    assert floor(counter, range(1))["phases"].keys() == {"generation"}


def test_trl_step_benchmark_without_trl_says_how_to_get_it(tmp_path):
    """Where TRL is not installed (the dev requirements install it: hidden here as if absent)."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['trl'] = None\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "dev/trl_step.py", "--model", "tiny"], cwd=ROOT,
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line, no traceback
    assert "pip install trl" in result.stderr


@pytest.mark.slow  # the quick suite stays under 5 minutes; CI runs it
def test_prompt_sharing_benchmark():
    out, record = run_json(["dev/prompt_sharing.py", "--model", "tiny", "--prompts", "2", "--completion_tokens",
                            "8", "--repeats", "1", "--device", "cpu"])
    assert record["prompts"] == 2 and record["num_generations"] == 4 and len(record["prompt_tokens"]) == 2
    assert record["plain_s"] > 0 and record["shared_s"] > 0 and "shared / plain" in out
    assert abs(record["shared_over_plain"] - record["shared_s"] / record["plain_s"]) < 0.01


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run its full checks")
def test_cuda_checks_without_a_gpu_is_one_line_and_installs_nothing(tmp_path):
    """"No CUDA GPU" is no missing package: carried wheels beside it stay uninstalled (a trial on a CPU
    machine once unpacked 132 MB into the repository, past what a device call carries)."""
    carry = tmp_path / "carry"
    (carry / "wheels").mkdir(parents=True)
    (carry / "wheels" / "transformers-5.25.0-py3-none-any.whl").write_bytes(b"")
    result = subprocess.run(["bash", "scripts/cuda_checks.sh", str(tmp_path / "out")], cwd=ROOT,
                            capture_output=True, text=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin",
                                                                      "CARRY_DIR": str(carry),
                                                                      "CARRY_SITE": str(tmp_path / "site")})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no CUDA GPU" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "site").exists() and "installing" not in result.stdout


@pytest.mark.slow  # 10-16 s: a benchmark CLI end to end, in several processes
def test_rollout_benchmark_counts_work_per_decode_step():
    out, record = run_json(["benchmarks.rollout", "--model", "tiny", "--prompts", "2", "--num_generations", "2",
                            "--max_new_tokens", "8", "--repeats", "1", "--device", "cpu", "--count_launches"])
    assert record["launches_per_step_eager"] > 50 and "aten ops per decode step, eager" in out


def test_summary_table_of_the_cuda_checks(tmp_path):
    (tmp_path / "parts.tsv").write_text("tests\tok\t31\nstep\tFAILED (exit 124)\t100\n"
                                        "step_graphs\tSKIPPED (budget spent)\t0\n")
    step = {"part": "step", "median_time_per_step_s": 9.5, "peak_memory_gb": 17.2, "peak_memory_reserved_gb": 19.0}
    (tmp_path / "results.jsonl").write_text(json.dumps(step) + "\n")
    result = subprocess.run([sys.executable, "-m", "benchmarks.summary", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and lines[0].startswith("part")
    assert "FAILED (exit 124)" in lines[2] and "s/step 9.5" in lines[2] and "reserved GB 19.0" in lines[2]
    assert "SKIPPED" in lines[3]
    missing = subprocess.run([sys.executable, "-m", "benchmarks.summary", str(tmp_path / "none")], cwd=ROOT,
                             capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.startswith("error: no ") and missing.stderr.count("\n") == 1


@pytest.mark.slow  # the quick suite stays under 5 minutes; CI runs it
def test_continuous_batching_benchmark():
    out, record = run_json(["dev/continuous.py", "--model", "tiny", "--prompts", "6", "--rows", "2",
                            "--max_new_tokens", "24", "--median_tokens", "10", "--repeats", "1", "--device", "cpu"])
    assert record["static_tokens_per_s"] > 0 and record["continuous_tokens_per_s"] > 0 and "speedup" in out
    assert record["max_tokens"] <= 24 and abs(record["speedup"] - record["continuous_tokens_per_s"]
                                              / record["static_tokens_per_s"]) <= 0.01


@pytest.mark.slow  # 10-16 s: a benchmark CLI end to end, in several processes
def test_sft_step_benchmark_runs_each_way_in_its_own_process():
    out, record = run_json(["dev/sft_step.py", "--model", "tiny", "--batch_size", "2", "--steps", "1",
                            "--device", "cpu"])
    assert "projected:" in out and "logits:" in out and "full:" in out
    for way in ("projected", "logits", "full"):
        assert record[f"{way}_seconds_per_step"] > 0 and record[f"{way}_peak_memory_gb"] > 0
    assert record["loss_difference"] < 1e-4 and record["vocab_size"] == 512  # the same loss every way
    # what each way saves for the backward: the layers' activations, the logits (at the target
    # positions, or an fp32 copy at every position) only where the head made them
    projected, logits, full = (record[f"{way}_saved_gb"] for way in ("projected", "logits", "full"))
    assert projected["Linear"] > 0 and logits["Linear"] > 0 and full["Linear"] > 0
    assert full["loss"] > 2 * logits["loss"] > 2 * projected["loss"]


def test_memory_ledger_adds_up_and_its_activations_match_a_whole_model_tally():
    """The ledger's lines add up to its phases and peak, and the activations it scales from 1- and
    2-layer tallies equal a tally of the whole (tiny, 4-layer) model."""
    from benchmarks.memory import MemoryArgs
    from grpo.memory import ledger, saved_bytes

    args = MemoryArgs(model="tiny", prompt_tokens=20, completion_tokens=16)
    got = ledger(args)
    assert got["held_all_step"] == pytest.approx(got["weights"] + got["gradients"] + got["adamw_moments"]
                                                 + got["reference"])
    assert got["peak"] == pytest.approx(got["held_all_step"] + max(got["rollout"], got["training"]))
    one, two = saved_bytes(args, 1), saved_bytes(args, 2)
    from models.loading import load_tokenizer
    from models.tiny import tiny_config

    layers = tiny_config(load_tokenizer("tiny")).num_hidden_layers
    assert one + (layers - 1) * (two - one) == pytest.approx(saved_bytes(args, layers), rel=0.02)
    lora = ledger(MemoryArgs(model="tiny", finetune="lora", prompt_tokens=20, completion_tokens=16))
    assert lora["reference"] == 0 and lora["gradients"] < got["gradients"] / 5
    graphs = ledger(MemoryArgs(model="tiny", cuda_graphs=True, prompt_tokens=20, completion_tokens=16))
    assert graphs["training"] == pytest.approx(got["training"] + got["decode_weights"] + got["kv_cache"])


def test_device_ops_count_what_computes_or_copies_not_views():
    """The CPU's count of what a CUDA step launches: views, no-op casts and allocations are free; a
    reshape that copies, a cast that converts and an in-place op each count once."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.common import device_ops

    x = torch.randn(8, 6, dtype=torch.bfloat16)

    def count(fn) -> int:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        return device_ops(prof.events())

    assert count(lambda: (x.view(6, 8), x.t(), x[:, :3], x.chunk(2), x.to(torch.bfloat16), torch.empty(4))) == 0
    assert count(lambda: x.t().reshape(48)) == 1  # a transposed reshape copies
    assert count(lambda: x.float()) == 1
    assert count(lambda: (x + 1, x.mul_(2), torch.softmax(x, -1))) == 3
    assert count(lambda: torch.nn.functional.rms_norm(x, (6,))) == 1  # one op issued (a kernel on CUDA)


@pytest.mark.slow  # the quick suite stays under 5 minutes; CI runs it
def test_launch_counts_per_decoded_token():
    """benchmarks.launches on a 4-layer Qwen3 with the full vocabulary: the step's ops per layer in the
    CUDA layout (before the fused norms, RoPE and attention: 46), the sampling loop's ops around it
    (before the GPU's exponential race: 48) and host reads at one look per SYNC_EVERY."""
    from benchmarks.launches import LaunchArgs, launches
    from sampling.batch import SYNC_EVERY

    figures = launches(LaunchArgs(model="random:qwen3-4x256", rows=4))
    assert figures["step_ops_per_layer"] <= 25
    assert figures["step_ops"] == figures["step_ops_outside_layers"] + figures["layers"] * figures["step_ops_per_layer"]
    assert 0 < figures["loop_ops_per_token"] <= 30
    assert figures["host_reads_per_token"] == 1 / SYNC_EVERY


@pytest.mark.slow  # the quick suite stays under 5 minutes; CI runs it
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_drift_benchmark(precision):
    """The drift of the engine's log-probs from the training forward's, as the log reports it: nil in fp32
    (the CPU's policy), finite and small but not nil under the CUDA policy forced on the CPU (bf16
    autocast, a bf16 decode step). Only eager on the CPU (graphs need CUDA)."""
    out, r = run_json(["benchmarks.drift", "--model", "tiny", "--device", "cpu", "--max_new_tokens", "6",
                       "--prompts", "1", "--num_generations", "2", "--precision", precision])
    assert "eager:" in out and "graphs_sampler_kl" not in r and r["tokens_per_rollout"] == 12
    assert r["eager_sampler_ratio_min"] <= r["eager_sampler_ratio_mean"] <= r["eager_sampler_ratio_max"]
    if precision == "fp32":
        assert r["eager_sampler_kl"] < 1e-6 and r["eager_sampler_logp_diff_max"] < 1e-4
        assert r["forward_vs_fp32_diff_max"] == 0.0
    else:
        assert 0 < r["eager_sampler_logp_diff_max"] < 0.1 and 0 <= r["eager_sampler_kl"] < 1e-3
        assert r["forward_vs_fp32_diff_max"] > 0


def test_drift_benchmark_compares_graphed_to_eager_up_to_each_row_s_first_different_token():
    from benchmarks.drift import graphed_against_eager
    from sampling import Completions

    eager = Completions([0, 0], [[1, 2, 3], [4, 5]], [True, True], [[-1.0, -2.0, -3.0], [-1.0, -1.0]])
    graphed = Completions([0, 0], [[1, 2, 3], [4, 6]], [True, True], [[-1.0, -2.5, -3.0], [-1.25, -9.0]])
    # row 0 equal (largest |diff| 0.5); row 1 differs at its second token: only its first counts (0.25)
    assert graphed_against_eager(eager, graphed) == {"graphs_rows_equal_eager": 0.5, "graphs_vs_eager_diff_max": 0.5}
    graphed.logprobs[0][1] = -2.0
    assert graphed_against_eager(eager, graphed)["graphs_vs_eager_diff_max"] == 0.25
