"""Device work per decoded token, counted on the CPU: what an eager CUDA rollout launches, how often it waits.

    python -m benchmarks.launches                                   (Qwen3-0.6B)
    python -m benchmarks.launches --model random:meta-llama/Llama-3.2-1B-Instruct

An eager GPU decode step pays a kernel launch (host time) per op it issues; on a small model those
launches take longer than reading its bf16 weights, so the step is bound by its launches. A CUDA graph
(`--cuda_graphs`, the CUDA default) replays the whole step as one launch. Counted here with torch.profiler
on the CPU (`benchmarks.common.device_ops`: ops issued from Python that compute or copy):
- the decode step in its CUDA layout (q/k/v and gate/up fused, every product one matmul), on 1 and 2
  layers of the model's shape, scaled to its depth (every layer issues the same);
- the sampling loop's own ops per token around the step (sampling the GPU way, recording, the eos
  check): a 32-token rollout less a 16-token one, less the step's ops;
- host reads per token (each a device sync) at CUDA's default of one look every `SYNC_EVERY` steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch

import sampling.tokens
from benchmarks.common import BenchArgs, device_ops
from common.flags import flag
from models.loading import load_tokenizer, model_config, shape_model, with_layers
from sampling import Sampler, SamplingParams
from sampling.batch import SYNC_EVERY
from sampling.fast_decode import DecodeState


@dataclass
class LaunchArgs(BenchArgs):
    model: str = flag("random:Qwen/Qwen3-0.6B", "the model shape: random:<hub id> or tiny")
    rows: int = flag(16, "rows decoding at once (the recipe: 4 prompts x 4 completions)", low=1)


def _profiled(fn: Any) -> list[Any]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return list(prof.events())


GRAPH_INPUTS = 3  # a graphed step copies token, position and slot into its fixed inputs (GraphedDecodeStep)
SYNCS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::is_nonzero")


def counts(model: Any, tokenizer: Any, rows: int) -> dict[str, float]:
    """Device ops of one decode step of `model` (CUDA layout, and the CPU's own), and per token of a
    rollout with tokens chosen the GPU way: its ops and host reads."""
    token, position, slot = torch.zeros(rows, dtype=torch.long), torch.full((rows,), 7), torch.tensor([7])
    step = {}
    for layout in (True, False):
        state = DecodeState(model, torch.bfloat16, rows, 64, torch.device("cpu"), cuda_layout=layout)
        state.slot_mask[:] = True
        state.step(token, position, slot, 8)  # first call's lazy setup left out
        step[layout] = device_ops(_profiled(lambda s=state: s.step(token, position, slot, 8)))
    prompt = tokenizer("What is 12 times 7?")["input_ids"]

    sampler = Sampler.for_tokenizer(model, tokenizer, sync_every=SYNC_EVERY)

    def rollout(n: int) -> list[Any]:
        params = SamplingParams(num_samples=rows, max_new_tokens=n, temperature=1.0)
        return _profiled(lambda: sampler.sample([prompt], params))

    with mock.patch.dict(sampling.tokens.WAYS, cpu=sampling.tokens.WAYS["cuda"]):  # tokens chosen the GPU way
        rollout(4)
        short, long = rollout(16), rollout(32)
    per_token = (device_ops(long) - device_ops(short)) / 16
    syncs = (sum(e.name in SYNCS for e in long) - sum(e.name in SYNCS for e in short)) / 16
    return {"step_cuda_layout": step[True], "step_cpu_layout": step[False],
            "loop_per_token": per_token - step[False], "syncs_per_token": syncs}


def launches(args: LaunchArgs) -> dict[str, float]:
    """Per decoded token at the model's depth: the step's ops (per layer and outside the layers), the
    sampling loop's, their sum (an eager CUDA token's launches) and the host reads. Counted on 1 and 2
    layers of the shape (random bf16 weights), the 1-layer model being the 2-layer one cut short."""
    depth, tokenizer = model_config(args.model).num_hidden_layers, load_tokenizer("tiny")
    model = shape_model(args.model, 2).to(torch.bfloat16).eval()
    two = counts(model, tokenizer, args.rows)
    model.model.layers = model.model.layers[:1]
    with_layers(model.config, 1)
    one = counts(model, tokenizer, args.rows)
    per_layer = two["step_cuda_layout"] - one["step_cuda_layout"]
    outside = one["step_cuda_layout"] - per_layer
    step = outside + depth * per_layer
    return {"layers": depth, "step_ops_per_layer": per_layer, "step_ops_outside_layers": outside,
            "step_ops": step, "loop_ops_per_token": one["loop_per_token"],
            "eager_launches_per_token": step + one["loop_per_token"],
            "graphed_launches_per_token": 1 + GRAPH_INPUTS + one["loop_per_token"],
            "host_reads_per_token": one["syncs_per_token"]}


def main(argv: list[str] | None = None) -> None:
    from common.flags import parse_flags

    args, _ = parse_flags(LaunchArgs, argv, __doc__, prog="python -m benchmarks.launches")
    figures = launches(args)
    print(f"{args.model}, {args.rows} rows, per decoded token (CUDA layout, counted on the CPU):")
    for key, value in figures.items():
        print(f"  {key:26s} {value:8.2f}")
    print("JSON " + json.dumps({"benchmark": "launches", "model": args.model, "rows": args.rows, **figures}))


if __name__ == "__main__":
    from common.errors import run_cli

    run_cli(main)
