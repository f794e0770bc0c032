"""What the benchmarks share: prompts, peak memory, timing with device sync, the JSON line."""

from __future__ import annotations

import functools
import json
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from common.flags import DEVICE, flag
from data import make_synthetic
from data.prompt import encode_prompt

MODELS_HELP = ("tiny, random:qwen3-4x256, random:Qwen/Qwen3-0.6B, random:Qwen/Qwen2.5-0.5B-Instruct, "
               "random:HuggingFaceTB/SmolLM2-135M-Instruct, random:meta-llama/Llama-3.2-1B-Instruct, a folder or a "
               "hub id")


@dataclass
class BenchArgs:
    """The flags every benchmark takes; each benchmark adds its own in a subclass."""

    model: str = flag("tiny", MODELS_HELP)
    device: str | None = flag(None, "cpu or cuda (default: cuda when available)", text=DEVICE)


@dataclass
class CompletionArgs(BenchArgs):
    """What a rollout benchmark draws: --prompts x --num_generations completions of exactly --max_new_tokens
    tokens each, at --temperature and --top_p. A benchmark redeclares a field to change its default."""

    prompts: int = flag(4, "distinct prompts", low=1)
    num_generations: int = flag(4, "samples per prompt", low=1)
    max_new_tokens: int = flag(128, "new tokens per sample (forced: every row runs to the end)", low=1)
    temperature: float = flag(0.7, "sampling temperature (0: greedy)", low=0)
    top_p: float = flag(1.0, "nucleus threshold", above=0, high=1)


@dataclass
class StepsArgs(BenchArgs):
    """What a GRPO step benchmark runs: --warmup untimed steps, then --steps timed ones, completions of at most
    --max_new_tokens tokens."""

    max_new_tokens: int = flag(128, "--max_completion_length of the steps", low=1)
    steps: int = flag(5, "timed steps", low=1)
    warmup: int = flag(2, "untimed steps first", low=0)


# Peak memory bandwidth (GB/s) by GPU name, for the decode roofline.
GPU_BANDWIDTH_GBS = {"H200": 4800, "H100 SXM": 3350, "H100 PCIe": 2000, "H100": 3350, "A100": 2039, "A10G": 600,
                     "L4": 300, "A10": 600}


def prompts_for(tokenizer: Any, n: int) -> list[list[int]]:
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


FREE_OPS = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::_unsafe_view", "aten::resize_",
            "aten::lift_fresh"}  # allocations and views that return no alias in their schema: no kernel


@functools.cache  # asked once per profiled event: thousands of events, a few dozen names
def _is_view(name: str) -> bool:
    """An aten op whose every overload returns aliases of its input, written to by none (`view`, `slice`,
    `t`, `chunk`, `to`: a `to` that converts shows the copy inside it). Overloads on lists and strings
    (`slice.str`) are not tensor ops."""
    packet = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
    if packet is None or not packet.overloads():
        return False
    schemas = [sch for o in packet.overloads()
               if (sch := getattr(packet, o)._schema).arguments and str(sch.arguments[0].type) == "Tensor"]
    def aliases(s: Any) -> bool:
        return bool(s.returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in s.returns)
    return bool(schemas) and all(aliases(s) for s in schemas)


def _does_work(event: Any) -> bool:
    """True when a profiled aten op, or an op inside it, computes or copies (a kernel on a GPU)."""
    free = event.name in FREE_OPS or _is_view(event.name)
    return not free or any(_does_work(child) for child in event.cpu_children)


def device_ops(events: list[Any]) -> int:
    """How many ops issued from Python do device work, out of torch.profiler's CPU events: top-level aten
    ops (not inside another aten op) that compute or copy, themselves or inside. Views, reshapes that
    copy nothing and allocations are free. On a GPU each is a kernel launch or two (a broadcast `baddbmm`
    copies its input first): the CPU's count of what a CUDA step launches."""
    def top(e: Any) -> bool:
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        return parent is None
    return sum(e.name.startswith("aten::") and top(e) and _does_work(e) for e in events)


def kernel_launches(fn: Callable[[], Any], device: str) -> int:
    """What `fn` asks of the device, counted with torch.profiler: on CUDA the kernel launches (a CUDA
    graph replay is one launch); on the CPU `device_ops`, the same Python-issued work."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    if cuda:
        launch = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")
        return sum(e.name in launch for e in prof.events())
    return device_ops(prof.events())


def median(values: list[float]) -> float:
    return statistics.median(values)


def print_json(record: dict[str, Any]) -> None:
    print("JSON " + json.dumps(record), flush=True)
