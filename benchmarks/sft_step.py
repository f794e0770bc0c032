"""SFT step cost: the loss through target positions, chunked (ours), against full-vocabulary logits.

    python -m benchmarks.sft_step --model tiny
    python -m benchmarks.sft_step --model random:HuggingFaceTB/SmolLM2-135M-Instruct --data_dir $GSM8K_DIR --lora

Each way runs in a fresh process of its own (so the CPU's peak resident memory is that way's alone),
alternated over --repeats processes: the model, AdamW, then --steps optimizer steps on batches of
--batch_size examples (GSM8K's train split with --data_dir, else the synthetic set) after one warm-up
step. Prints s/step and the step's peak memory (CUDA: peak allocated; CPU: peak resident set, its
high-water mark reset after the warm-up) beside the weights and AdamW state, and one JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

from benchmarks.common import BenchArgs
from common.errors import run_cli
from common.flags import flag

WAYS = ("chunked", "full")


@dataclass
class SFTStepArgs(BenchArgs):
    batch_size: int = flag(8, "examples per step", low=1)
    steps: int = flag(3, "timed optimizer steps per process (after one warm-up step)", low=1)
    repeats: int = flag(1, "processes of each way, alternated", low=1)
    lora: bool = flag(False, "train LoRA adapters (r 16) instead of every weight")
    data_dir: str | None = flag(None, "GSM8K folder: its train examples (default: the synthetic set)")
    worker: str | None = flag(None, "internal: run one way in this process", choices=WAYS)


def _rss_gb(field: str) -> float:
    """VmRSS (now) or VmHWM (the high-water mark) of this process, in GB (Linux)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # writing 5 to clear_refs resets VmHWM to the current RSS (Linux)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def worker(args: SFTStepArgs, device: str) -> dict:
    """One way's figures, in this process."""
    import time

    import torch

    from data import load_records, make_synthetic
    from models import autocast, load_model_and_tokenizer
    from sft.batching import collate, completion_loss_sum, completion_loss_sum_full, encode_records

    model, tokenizer = load_model_and_tokenizer(args.model, device=device)
    if args.lora:
        from models.lora import add_lora

        model = add_lora(model, 16, 32, 0.0)
    model.train()
    n = args.batch_size * (args.steps + 1)
    records = (load_records("gsm8k", "train", args.data_dir, n) if args.data_dir else make_synthetic("train", n))
    examples, _ = encode_records(tokenizer, records, 512)
    batches = [collate(examples[i: i + args.batch_size], tokenizer.pad_token_id)
               for i in range(0, len(examples), args.batch_size)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    loss_fn = completion_loss_sum if args.worker == "chunked" else completion_loss_sum_full
    times = []
    for k, batch in enumerate(batches):
        if k == 1:
            _reset_peak(device)
        batch = {name: v.to(device) for name, v in batch.items()}
        t0 = time.perf_counter()
        with autocast(device):
            loss = loss_fn(model, batch) / int((batch["labels"][:, 1:] != -100).sum())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if k > 0:
            times.append(time.perf_counter() - t0)
    cuda = device.startswith("cuda")
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else _rss_gb("VmHWM")
    return {"way": args.worker, "seconds_per_step": sorted(times)[len(times) // 2], "peak_memory_gb": peak,
            "weights_gb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30,
            "adamw_state_gb": 2 * sum(p.numel() * p.element_size() for p in params) / 2**30,
            "tokens_per_step": sum(int(b["attention_mask"].sum()) for b in batches[1:]) / len(batches[1:]),
            "vocab_size": model.config.vocab_size, "loss": loss.item()}


def main(argv: list[str] | None = None) -> None:
    from common.flags import parse_flags

    args, _ = parse_flags(SFTStepArgs, argv, __doc__, prog="python -m benchmarks.sft_step")
    from models import default_device

    device = args.device or default_device()
    if args.worker:
        print("WORKER " + json.dumps(worker(args, device)))
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    runs: dict[str, list[dict]] = {way: [] for way in WAYS}
    for _ in range(args.repeats):
        for way in WAYS:
            done = subprocess.run([sys.executable, "-m", "benchmarks.sft_step", *argv, "--device", device,
                                   "--worker", way], capture_output=True, text=True)
            if done.returncode != 0:
                from common.errors import fail

                fail(f"the {way} SFT step failed: {done.stderr.strip().splitlines()[-1:]}")
            line = next(x for x in done.stdout.splitlines() if x.startswith("WORKER "))
            runs[way].append(json.loads(line[7:]))
    best = {way: min(r, key=lambda x: x["seconds_per_step"]) for way, r in runs.items()}
    first = best["chunked"]
    record = {"benchmark": "sft_step", "model": args.model, "device": device, "lora": args.lora,
              "batch_size": args.batch_size, "tokens_per_step": first["tokens_per_step"],
              "vocab_size": first["vocab_size"], "weights_gb": round(first["weights_gb"], 3),
              "adamw_state_gb": round(first["adamw_state_gb"], 3), "repeats": args.repeats,
              **{f"{way}_seconds_per_step": round(best[way]["seconds_per_step"], 3) for way in WAYS},
              **{f"{way}_peak_memory_gb": round(best[way]["peak_memory_gb"], 3) for way in WAYS},
              "loss_difference": abs(best["chunked"]["loss"] - best["full"]["loss"]),
              "speedup": round(best["full"]["seconds_per_step"] / best["chunked"]["seconds_per_step"], 2)}
    print(f"{args.model}{' + LoRA' if args.lora else ''} on {device}: batch {args.batch_size}, "
          f"{first['tokens_per_step']:.0f} tokens/step, vocabulary {first['vocab_size']}; weights "
          f"{first['weights_gb']:.3f} GB, AdamW state {first['adamw_state_gb']:.3f} GB")
    for way in WAYS:
        way_best = best[way]
        print(f"  {way + ':':<9} {way_best['seconds_per_step']:7.3f} s/step, peak {way_best['peak_memory_gb']:.3f} GB")
    print(f"  speedup:  {record['speedup']:.2f}x (fastest process of {args.repeats} each)")
    print("JSON " + json.dumps(record))


if __name__ == "__main__":
    run_cli(main)
