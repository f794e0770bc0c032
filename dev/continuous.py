"""Continuous batching against static batches on a length-skewed workload, like GSM8K answers.

    python dev/continuous.py --model tiny --prompts 64 --rows 16 --max_new_tokens 512

Completion lengths are forced by a seeded stop schedule shaped like an untuned Qwen3-0.6B on GSM8K: a
median of --median_tokens (~250), a long tail up to --max_new_tokens (log-normal, sigma 0.45, clipped).
Both ways decode the same prompts with the same lengths on the lean decode step: static batches of
--rows prompts (a batch runs until its longest row ends; finished rows are dropped once at most half
remain) against --rows continuous rows refilled from the queue. Timed alternately over --repeats runs
after a warm-up of each; prints tokens/s of each, the ratio, and one JSON line.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.common import BenchArgs
from common.errors import run_cli
from common.flags import flag


@dataclass
class ContinuousArgs(BenchArgs):
    prompts: int = flag(64, "prompts (one greedy completion each)", low=1)
    rows: int = flag(16, "rows decoded at once: the static batch size and the continuous row count", low=1)
    max_new_tokens: int = flag(512, "the length limit (the tail of the schedule reaches it)", low=2)
    median_tokens: int = flag(250, "median forced completion length", low=1)
    repeats: int = flag(2, "timed runs of each, alternated", low=1)
    seed: int = flag(0, "seed of the stop schedule", low=0)


def stop_schedule(n: int, median: int, limit: int, seed: int) -> list[int]:
    """n completion lengths: log-normal around `median` (sigma 0.45), clipped to [1, limit]."""
    import math
    import random

    rng = random.Random(seed)
    return [max(1, min(limit, round(math.exp(rng.gauss(math.log(median), 0.45))))) for _ in range(n)]


def main(argv: list[str] | None = None) -> None:
    from common.flags import parse_flags

    args, _ = parse_flags(ContinuousArgs, argv, __doc__, prog="python dev/continuous.py")

    from benchmarks.common import alternate, median, print_json
    from data import make_synthetic
    from data.prompt import encode_prompt
    from models import default_device, load_model_and_tokenizer
    from sampling import Sampler, SamplingParams
    from sampling.fast_decode import supports

    device = args.device or default_device()
    model, tokenizer = load_model_and_tokenizer(args.model, device=device)
    model.eval()
    if not supports(model):
        from common.errors import fail

        fail(f"{args.model} does not take the lean decode step, which continuous batching needs")
    records = make_synthetic("test", max_samples=args.prompts, seed=args.seed)
    prompts = [encode_prompt(tokenizer, r["question"]) for r in records]
    lengths = stop_schedule(len(prompts), args.median_tokens, args.max_new_tokens, args.seed)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    samplers = {"static": Sampler.for_tokenizer(model, tokenizer, batch_size=args.rows),
                "continuous": Sampler.for_tokenizer(model, tokenizer, batch_size=args.rows, continuous=True)}
    runs = {name: lambda one=one: one.sample(prompts, params, stop_at=lengths) for name, one in samplers.items()}
    times, peaks = alternate(runs, args.repeats, device)
    tokens = sum(lengths)
    tps = {name: tokens / median(t) for name, t in times.items()}
    record = {"benchmark": "continuous", "model": args.model, "device": device, "prompts": len(prompts),
              "rows": args.rows, "max_new_tokens": args.max_new_tokens,
              "median_tokens": sorted(lengths)[len(lengths) // 2],
              "mean_tokens": round(tokens / len(lengths), 1), "max_tokens": max(lengths), "repeats": args.repeats,
              "static_tokens_per_s": round(tps["static"], 1), "continuous_tokens_per_s": round(tps["continuous"], 1),
              "speedup": round(tps["continuous"] / tps["static"], 2),
              "static_seconds": [round(t, 3) for t in times["static"]],
              "continuous_seconds": [round(t, 3) for t in times["continuous"]]}
    print(f"{args.model} on {device}: {len(prompts)} prompts, completion lengths median {record['median_tokens']}, "
          f"mean {record['mean_tokens']}, max {record['max_tokens']} (limit {args.max_new_tokens}); {args.rows} rows")
    for name in ("static", "continuous"):
        print(f"  {name + ':':<12} {tps[name]:9.1f} tokens/s  (median of {args.repeats}; peak {peaks[name]:.2f} GB)")
    print(f"  speedup:     {record['speedup']:.2f}x")
    print_json(record)


if __name__ == "__main__":
    run_cli(main)
