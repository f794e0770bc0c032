"""The training forward+backward with each group's prompt run once, against one forward per row.

    python dev/prompt_sharing.py --model tiny --data_dir ../shared/data/gsm8k --completion_tokens 200
    python dev/prompt_sharing.py --model random:Qwen/Qwen3-0.6B --device cuda --data_dir ...

--prompts GSM8K train questions (synthetic ones without --data_dir / $GSM8K_DIR), G samples each,
random completions of 60-100% of --completion_tokens; both ways run the same micro-batches with the
GRPO loss's log-prob pass and a backward, alternated over --repeats runs after a warm-up. Prints the
median seconds of each, the ratio, peak memory, and one JSON line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from benchmarks.common import BenchArgs
from common.errors import run_cli
from common.flags import flag


@dataclass
class SharingArgs(BenchArgs):
    data_dir: str | None = flag(None, "GSM8K folder (default: $GSM8K_DIR; synthetic without)")
    prompts: int = flag(4, "distinct prompts", low=1)
    num_generations: int = flag(4, "G: rows per prompt", low=1)
    micro_batch_size: int = flag(4, "rows per forward/backward", low=1)
    completion_tokens: int = flag(200, "longest completion", low=2)
    repeats: int = flag(3, "timed runs of each, alternated", low=1)


def main(argv: list[str] | None = None) -> None:
    from common.flags import parse_flags

    args, _ = parse_flags(SharingArgs, argv, __doc__, prog="python dev/prompt_sharing.py")

    import torch

    from benchmarks.common import alternate, median, print_json
    from data import load_records
    from data.prompt import encode_prompt
    from grpo.batch import completion_logprobs, pack
    from models import autocast, default_device, load_model_and_tokenizer

    device = args.device or default_device()
    data_dir = args.data_dir or os.environ.get("GSM8K_DIR")
    dataset = "gsm8k" if data_dir else "synthetic"
    model, tokenizer = load_model_and_tokenizer(args.model, device=device)
    model.train()
    records = load_records(dataset, "train", data_dir, args.prompts)
    prompts = [encode_prompt(tokenizer, r["question"]) for r in records]
    G, N = args.num_generations, args.completion_tokens
    gen = torch.Generator().manual_seed(0)
    lengths = (N * (0.6 + 0.4 * torch.rand(len(prompts) * G, generator=gen))).long().clamp(min=1).tolist()
    completions = [torch.randint(0, len(tokenizer), (n,), generator=gen).tolist() for n in lengths]
    batch = pack([q for q in prompts for _ in range(G)], completions, tokenizer.pad_token_id, device)

    def forward_backward(share: bool) -> None:
        for s in range(0, len(completions), args.micro_batch_size):
            mb = batch.take(slice(s, s + args.micro_batch_size))
            with autocast(device):
                logp, _ = completion_logprobs(model, mb, 0.7, with_entropy=True, share_prompts=share)
            (logp * mb.completion_mask).sum().backward()
        model.zero_grad(set_to_none=True)

    runs = {"plain": lambda: forward_backward(False), "shared": lambda: forward_backward(True)}
    times, peaks = alternate(runs, args.repeats, device)
    t = {name: median(v) for name, v in times.items()}
    record = {
        "benchmark": "prompt_sharing", "model": args.model, "device": device, "dataset": dataset,
        "prompts": len(prompts), "num_generations": G, "micro_batch_size": args.micro_batch_size,
        "prompt_tokens": [len(q) for q in prompts], "completion_tokens_mean": round(sum(lengths) / len(lengths), 1),
        "plain_s": round(t["plain"], 4), "shared_s": round(t["shared"], 4),
        "shared_over_plain": round(t["shared"] / t["plain"], 3),
        "plain_seconds": [round(x, 4) for x in times["plain"]],
        "shared_seconds": [round(x, 4) for x in times["shared"]],
        "plain_peak_memory_gb": round(peaks["plain"], 3), "shared_peak_memory_gb": round(peaks["shared"], 3),
    }
    print(f"{args.model} on {device}: {len(prompts)} {dataset} prompts ({min(record['prompt_tokens'])}-"
          f"{max(record['prompt_tokens'])} tokens) x {G} completions (mean {record['completion_tokens_mean']} "
          f"tokens), micro-batches of {args.micro_batch_size}, forward+backward")
    print(f"  one forward per row:   {t['plain']:7.3f} s  (median of {args.repeats}; peak {peaks['plain']:.2f} GB)")
    print(f"  prompt once per group: {t['shared']:7.3f} s  (median of {args.repeats}; peak {peaks['shared']:.2f} GB)")
    print(f"  shared / plain:        {record['shared_over_plain']:.3f}")
    print_json(record)


if __name__ == "__main__":
    run_cli(main)
