"""What both benchmarks share: prompts, peak memory, timing with device sync, the JSON line."""

from __future__ import annotations

import json
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from common.flags import DEVICE, flag

MODELS_HELP = ("tiny, random:qwen3-4x256, random:Qwen/Qwen3-0.6B, random:Qwen/Qwen2.5-0.5B-Instruct, "
               "random:HuggingFaceTB/SmolLM2-135M-Instruct, random:meta-llama/Llama-3.2-1B-Instruct, a folder or a "
               "hub id")


@dataclass
class BenchArgs:
    """The flags every benchmark takes; each benchmark adds its own in a subclass."""

    model: str = flag("tiny", MODELS_HELP)
    device: str | None = flag(None, "cpu or cuda (default: cuda when available)", text=DEVICE)

# Peak memory bandwidth (GB/s) by GPU name, for the decode roofline.
GPU_BANDWIDTH_GBS = {"H200": 4800, "H100 SXM": 3350, "H100 PCIe": 2000, "H100": 3350, "A100": 2039, "A10G": 600,
                     "L4": 300, "A10": 600}


def prompts_for(tokenizer: Any, n: int) -> list[list[int]]:
    from data import make_synthetic
    from data.prompt import encode_prompt

    return [encode_prompt(tokenizer, r["question"]) for r in make_synthetic("test", max_samples=n)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def peak_memory_gb(device: str) -> float:
    """CUDA peak allocated since the last reset, or the process's peak RSS on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def gpu_bandwidth_gbs() -> float | None:
    name = torch.cuda.get_device_name()
    for key, value in GPU_BANDWIDTH_GBS.items():
        if key in name:
            return float(value)
    return None


def alternate(runs: dict[str, Callable[[], Any]], repeats: int, device: str,
              ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """(seconds of each timed run, peak memory in GB) per name: one warm-up run of each (its peak is the
    one reported), then `repeats` rounds that run each once in turn, so drift hits all alike."""
    peaks: dict[str, float] = {}
    for name, fn in runs.items():
        reset_peak(device)
        fn()
        peaks[name] = peak_memory_gb(device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn, device))
    return times, peaks


def kernel_launches(fn: Callable[[], Any], device: str) -> int:
    """What `fn` asks of the device, counted with torch.profiler: on CUDA the kernel launches (a CUDA
    graph replay is one launch); on the CPU the aten ops it runs, the same Python-issued work."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    names = [e.name for e in prof.events()]
    if cuda:
        launch = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")
        return sum(n in launch for n in names)
    return sum(n.startswith("aten::") for n in names)


def median(values: list[float]) -> float:
    return statistics.median(values)


def print_json(record: dict[str, Any]) -> None:
    print("JSON " + json.dumps(record), flush=True)
