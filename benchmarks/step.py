"""GRPO step cost at the seed settings: 4 prompts x 4 generations = 16 completions, micro-batches of 4.

    python -m benchmarks.step --model tiny --max_new_tokens 128
    python -m benchmarks.step --model random:qwen3-4x256 --max_new_tokens 128   (4 layers, Qwen3's vocabulary)
    python -m benchmarks.step --model random:Qwen/Qwen3-0.6B --max_new_tokens 512 --device cuda

Runs --warmup + --steps real steps of `train_grpo` (full fine-tuning, beta 0.01, temperature 0.7) with
nothing saved (no checkpoint or model is written, as train_grpo.py's no-save switch does: the figures
come out as the steps end), and
prints the median time_per_step_s, its split (generation, reference, forward+backward, optimizer),
rollout tokens/s and peak memory, and a JSON line, flushed before the floor study starts (a run stopped
during it keeps these figures). `dev/trl_step.py` times the same step under TRL, on the same model
names.

The floor (one process; skip it with --no_floor): the same steps run again under a counter of their
matrix products, each distinct product is timed alone at its shapes (benchmarks/floor.py), and each
phase's time is printed beside the time its matrix products alone take: the share of the floor reached,
then the JSON line again with the floor's fields (the last JSON line is the fullest).

Data-parallel: `OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m benchmarks.step ...` runs
the same steps with the prompts split across processes (times are the slowest rank's, tokens summed).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from benchmarks.common import StepsArgs, median
from benchmarks.floor import MatmulCounter, floor, tagged_phases
from common.errors import run_cli
from common.flags import CUDA_GRAPHS, flag
from grpo.trainer import LOG_NAME, GRPOConfig, train_grpo
from sampling.cuda_graphs import use_cuda_graphs


@dataclass
class StepArgs(StepsArgs):
    prompts_per_step: int = flag(4, "prompts per step, over all processes", low=1)
    lora: bool = flag(False, "LoRA instead of full fine-tuning")
    cuda_graphs: str = flag("auto", "rollouts replay the decode step from CUDA graphs: as train_grpo.py "
                                    "--cuda_graphs (auto: on CUDA)", choices=CUDA_GRAPHS, bare="on")
    floor: bool = flag(True, "the floor study: a second, counted run of the steps", name="--no_floor")


def main(argv: list[str] | None = None) -> None:
    from common.flags import parse_flags

    args, _ = parse_flags(StepArgs, argv, __doc__, prog="python -m benchmarks.step")

    import tempfile
    from pathlib import Path

    from benchmarks.common import print_json
    from common.distributed import distributed_run

    with tempfile.TemporaryDirectory() as tmp, distributed_run(args.device) as (dist, device):
        run = Path(dist.gather_objects(tmp)[0]) / "run"  # rank 0's folder: only rank 0 writes
        cfg = GRPOConfig(model_name=args.model, dataset="synthetic", grpo_output=str(run),
                         max_steps=args.warmup + args.steps, max_completion_length=args.max_new_tokens,
                         prompts_per_step=args.prompts_per_step, finetune="lora" if args.lora else "full",
                         device=device, cuda_graphs=args.cuda_graphs, save_models=False, show_progress=False)
        train_grpo(cfg)
        if not dist.is_main:
            return
        timed = [json.loads(x) for x in (run / LOG_NAME).read_text().splitlines()][args.warmup:]
        record = _timed_record(args, cfg, timed)
        print_json(record)  # flushed now: a run stopped during the floor study still leaves its figures
        if args.floor and dist.world_size == 1:
            counted = _counted_run(cfg, Path(tmp) / "counted", args.warmup)
            record.update(_print_floor(counted, timed, record, PHASES))
            print_json(record)  # the same record with the floor's fields: the last JSON line is the fullest


PHASES = {"time_per_step_s": "total", "generation_time_s": "generation", "reference_time_s": "reference",
          "backward_time_s": "forward+backward", "optimizer_time_s": "optimizer"}


def _timed_record(args: StepArgs, cfg: object, timed: list[dict]) -> dict:
    """The timed steps' figures (medians, peak memory), printed as a table."""
    graphs = use_cuda_graphs(args.cuda_graphs, timed[0]["device"])
    record = {"benchmark": "step", "model": args.model, "device": timed[0]["device"], "lora": args.lora,
              "cuda_graphs": graphs, "processes": timed[0]["world_size"],
              "completions_per_step": cfg.prompts_per_step * cfg.num_generations,
              "micro_batch_size": cfg.micro_batch_size, "max_new_tokens": args.max_new_tokens, "steps": len(timed),
              "completion_len_mean": round(sum(x["completion_len_mean"] for x in timed) / len(timed), 1),
              # the ledger (benchmarks.memory, docs/training.md) is set against these widths and the allocator's
              "prompt_len_mean": round(sum(x["prompt_len_mean"] for x in timed) / len(timed), 1),
              "prompt_len_max": max(x["prompt_len_max"] for x in timed),
              "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
              "peak_memory_gb": round(max(x["peak_memory_gb"] for x in timed), 3),
              "peak_memory_reserved_gb": round(max(x["peak_memory_reserved_gb"] for x in timed), 3),
              "median_rollout_tokens_per_s": round(median([x["tokens_generated"] / x["generation_time_s"]
                                                           for x in timed]), 1)}
    for key in PHASES:
        record[f"median_{key}"] = round(median([x[key] for x in timed]), 4)
    print(f"{args.model} on {record['device']}{' (CUDA graphs)' if graphs else ''} x "
          f"{record['processes']} process(es): "
          f"{record['completions_per_step']} completions/step, "
          f"micro-batches of {cfg.micro_batch_size}, up to {args.max_new_tokens} new tokens "
          f"(mean {record['completion_len_mean']}), prompts of {record['prompt_len_mean']} tokens (max "
          f"{record['prompt_len_max']}), PYTORCH_CUDA_ALLOC_CONF={record['alloc_conf'] or '(unset)'}")
    for key, name in PHASES.items():
        print(f"  {name:<17} {record[f'median_{key}']:8.3f} s  (median of {len(timed)})")
    print(f"  rollout           {record['median_rollout_tokens_per_s']:8.0f} tokens/s (median)")
    print(f"  peak memory       {record['peak_memory_gb']:8.3f} GB "
          f"(reserved {record['peak_memory_reserved_gb']:.3f} GB)")
    return record


def _counted_run(cfg: object, out: object, warmup: int) -> tuple[dict, list[dict]]:
    """The same steps again (same seed: the same completions) with every matrix product counted; the
    floor over the timed steps, and this run's log (to check the steps matched)."""
    cfg = dataclasses.replace(cfg, grpo_output=str(out))
    counter = MatmulCounter()
    with tagged_phases(counter):
        train_grpo(cfg)
    log = [json.loads(x) for x in (out / LOG_NAME).read_text().splitlines()]
    return floor(counter, range(warmup, cfg.max_steps)), log[warmup:]


def _print_floor(counted: tuple[dict, list[dict]], timed: list[dict], record: dict, phases: dict[str, str]) -> dict:
    """Each phase's median time beside its matrix products' time alone; the JSON fields."""
    result, counted_log = counted
    same = [x["completion_len_mean"] for x in counted_log] == [x["completion_len_mean"] for x in timed]
    fields: dict = {"floor_steps_matched": same, "floor_timed_share_of_flops": result["timed_share_of_flops"]}
    print(f"  floor: each phase's matrix products timed alone at their shapes "
          f"({result['timed_shapes']} shapes, {result['timed_share_of_flops']:.0%} of the FLOPs; the rest at "
          f"their op's rate){'' if same else '  [the counted run drew other completions: approximate]'}")
    print(f"  {'':<17} {'time':>8} {'floor':>8} {'share':>6} {'GFLOP':>8}")
    total_floor = total_flop = 0.0
    for key in [k for k in phases if k != "time_per_step_s"]:
        phase = key.removesuffix("_time_s")  # the log's phase times are named after common.timing.Timer's phases
        p = result["phases"].get(phase, {"gflop": 0.0, "floor_s": 0.0})
        t = record[f"median_{key}"]
        total_floor, total_flop = total_floor + p["floor_s"], total_flop + p["gflop"]
        print(f"  {phases[key]:<17} {t:8.3f} {p['floor_s']:8.3f} {p['floor_s'] / t if t else 0:6.0%} {p['gflop']:8.1f}")
        fields[f"floor_{phase}_s"] = round(p["floor_s"], 4)
    t = record["median_time_per_step_s"]
    print(f"  {'total':<17} {t:8.3f} {total_floor:8.3f} {total_floor / t:6.0%} {total_flop:8.1f}")
    for shape in result["top_shapes"]:
        print(f"    {shape['op']} {shape['shapes']}: {shape['share_of_flops']:.0%} of the FLOPs, "
              f"{shape['gflop_per_s']:.0f} GFLOP/s alone")
    fields.update(floor_s=round(total_floor, 4), floor_share=round(total_floor / t, 3),
                  matmul_gflop_per_step=round(total_flop, 2), floor_top_shapes=result["top_shapes"])
    return fields


if __name__ == "__main__":
    run_cli(main)
