"""Rollout throughput: our engine against `model.generate` on the same prompts and sampling.

    python -m benchmarks.rollout --model tiny --prompts 4 --num_generations 8 --max_new_tokens 128
    python -m benchmarks.rollout --model random:Qwen/Qwen3-0.6B --prompts 4 --num_generations 4 --device cuda
    python -m benchmarks.rollout --model tiny --lora   (a LoRA-wrapped model, as GRPO --lora rolls out)
    python -m benchmarks.rollout --model random:meta-llama/Llama-3.2-1B-Instruct --dtype bfloat16 --device cpu

Both are forced to exactly --max_new_tokens new tokens per sequence (no early stop), timed alternately
over --repeats runs after a warm-up of each; prints tokens/s of each, the ratio, peak memory, and one
JSON line. On CUDA it also times our engine with the decode step replayed from CUDA graphs (kept across
runs as GRPO keeps them across steps: the warm-up run captures them), and gives the decode roofline:
weight bytes per step over the GPU's bandwidth. `--count_launches` adds the kernel launches per decode
step (on the CPU: aten ops per step), eager and graphed, from a profiled rollout of 16 and of 32 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.common import CompletionArgs
from common.errors import run_cli
from common.flags import flag


def report(record: dict, tokens_per_run: int, peaks: dict[str, float]) -> None:
    """The human-readable lines of a rollout benchmark record."""
    r = record
    print(f"{r['model']}{' + LoRA' if r['lora'] else ''} on {r['device']}: {r['prompts']} prompts x "
          f"{r['num_generations']} samples x {r['max_new_tokens']} tokens = {tokens_per_run} tokens/run")
    for name in ("ours", "generate"):
        print(f"  {name + ':':<9} {r[f'{name}_tokens_per_s']:10.1f} tokens/s  (median of {r['repeats']}; "
              f"peak {peaks[name]:.2f} GB)")
    print(f"  speedup:  {r['speedup']:.2f}x")
    if "ours_graphs_tokens_per_s" in r:
        print(f"  ours, CUDA graphs: {r['ours_graphs_tokens_per_s']:10.1f} tokens/s (peak {peaks['ours_graphs']:.2f} "
              f"GB): {r['speedup_graphs']:.2f}x generate")
    if "roofline_tokens_per_s" in r:
        print(f"  roofline: {r['roofline_tokens_per_s']:.0f} tokens/s from weight bytes / {r['bandwidth_gbs']} GB/s; "
              f"ours reaches {100 * r['ours_share_of_roofline']:.0f}%"
              + (f", with CUDA graphs {100 * r['ours_graphs_share_of_roofline']:.0f}%"
                 if "ours_graphs_share_of_roofline" in r else ""))
    for name in ("eager", "graphs"):
        if f"launches_per_step_{name}" in r:
            what = "kernel launches" if r["device"].startswith("cuda") else "aten ops"
            print(f"  {what} per decode step, {name}: {r[f'launches_per_step_{name}']}")



@dataclass
class RolloutArgs(CompletionArgs):
    num_generations: int = flag(8, "samples per prompt", low=1)
    repeats: int = flag(3, "timed runs of each, alternated", low=1)
    dtype: str | None = flag(None, "the model's dtype, float32 or bfloat16, for both sides (default: bf16 on CUDA, "
                                   "fp32 on the CPU)", choices=("float32", "bfloat16"))
    lora: bool = flag(False, "wrap the model in rank-16 LoRA adapters (non-zero B)")
    count_launches: bool = flag(False, "also count kernel launches per decode step (CPU: aten ops per step) with "
                                       "torch.profiler")


def main(argv: list[str] | None = None) -> None:
    from common.flags import parse_flags

    args, _ = parse_flags(RolloutArgs, argv, __doc__, prog="python -m benchmarks.rollout")

    import torch

    from benchmarks.common import alternate, gpu_bandwidth_gbs, kernel_launches, median, print_json, prompts_for
    from models import default_device, load_model_and_tokenizer
    from sampling import Sampler, SamplingParams
    from sampling.batch import left_pad

    device = args.device or default_device()
    model, tokenizer = load_model_and_tokenizer(args.model, device=device,
                                                dtype=getattr(torch, args.dtype) if args.dtype else None)
    if args.lora:
        from models.lora import add_lora

        model = add_lora(model, r=16, alpha=32, dropout=0.0)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; a trained adapter is not
                torch.nn.init.normal_(param, std=0.02)
    model.eval()
    prompts = prompts_for(tokenizer, args.prompts)
    G, N = args.num_generations, args.max_new_tokens
    tokens_per_run = len(prompts) * G * N

    samplers = {g: Sampler.for_tokenizer(model, tokenizer, cuda_graphs=g) for g in (False, True)}

    def ours(cuda_graphs: bool = False, new_tokens: int = N) -> None:
        samplers[cuda_graphs].sample(prompts, SamplingParams(num_samples=G, max_new_tokens=new_tokens, ignore_eos=True,
                                                             temperature=args.temperature, top_p=args.top_p))

    ids, mask = left_pad(prompts, tokenizer.pad_token_id, device)

    def generate() -> None:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=args.temperature,
                           top_p=args.top_p, top_k=0, num_return_sequences=G, max_new_tokens=N, min_new_tokens=N,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    runs = {"ours": ours, "generate": generate}
    if device.startswith("cuda"):
        runs["ours_graphs"] = lambda: ours(cuda_graphs=True)
    times, peaks = alternate(runs, args.repeats, device)
    tps = {name: tokens_per_run / median(t) for name, t in times.items()}
    n_params = sum(p.numel() for p in model.parameters())
    record = {
        "benchmark": "rollout", "model": args.model, "lora": args.lora, "device": device,
        "dtype": str(model.dtype).removeprefix("torch."),
        "params_m": round(n_params / 1e6, 2), "prompts": len(prompts), "num_generations": G, "max_new_tokens": N,
        "temperature": args.temperature, "repeats": args.repeats,
        "ours_tokens_per_s": round(tps["ours"], 1), "generate_tokens_per_s": round(tps["generate"], 1),
        "speedup": round(tps["ours"] / tps["generate"], 2),
        "ours_seconds": [round(t, 3) for t in times["ours"]],
        "generate_seconds": [round(t, 3) for t in times["generate"]],
        "ours_peak_memory_gb": round(peaks["ours"], 3), "generate_peak_memory_gb": round(peaks["generate"], 3),
    }
    if "ours_graphs" in runs:
        record.update(ours_graphs_tokens_per_s=round(tps["ours_graphs"], 1),
                      speedup_graphs=round(tps["ours_graphs"] / tps["generate"], 2),
                      ours_graphs_seconds=[round(t, 3) for t in times["ours_graphs"]],
                      ours_graphs_peak_memory_gb=round(peaks["ours_graphs"], 3))
    if args.count_launches:  # per decode step: the difference between 32 and 16 tokens, over 16 steps
        for name, graphed in (("eager", False), ("graphs", True)) if device.startswith("cuda") else (("eager", False),):
            short, long = (kernel_launches(lambda n=n, g=graphed: ours(g, n), device) for n in (16, 32))
            record[f"launches_per_step_{name}"] = round((long - short) / 16, 1)
    if device.startswith("cuda"):
        bandwidth = gpu_bandwidth_gbs()
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if bandwidth:
            roofline = bandwidth * 1e9 / weight_bytes * len(prompts) * G  # decode steps/s x rows per step
            record.update(gpu=torch.cuda.get_device_name(), bandwidth_gbs=bandwidth,
                          roofline_tokens_per_s=round(roofline, 1),
                          ours_share_of_roofline=round(tps["ours"] / roofline, 3))
            if "ours_graphs" in runs:
                record["ours_graphs_share_of_roofline"] = round(tps["ours_graphs"] / roofline, 3)
    report(record, tokens_per_run, peaks)
    print_json(record)


if __name__ == "__main__":
    run_cli(main)
