"""SFT step cost, three ways to the same loss: ours (`projected`: the decoder's hidden states at the
target positions, projected onto the vocabulary a chunk at a time inside the loss), `logits` (the
model's head at the target positions, then a chunked log-softmax: the path before, and still the one
for heads the loss cannot project itself) and `full` (full-vocabulary logits at every position, an
fp32 copy, cross-entropy).

    python dev/sft_step.py --model tiny
    python dev/sft_step.py --model random:HuggingFaceTB/SmolLM2-135M-Instruct --data_dir $GSM8K_DIR --lora

Each way runs in a fresh process of its own (so the CPU's peak resident memory is that way's alone),
alternated over --repeats processes: the model, AdamW, then --steps optimizer steps on batches of
--batch_size examples (GSM8K's train split with --data_dir, else the synthetic set) after one warm-up
step. Prints s/step and the step's peak memory (CUDA: peak allocated; CPU: peak resident set, its
high-water mark reset after the warm-up) beside the weights and AdamW state, and one JSON line.

Where the memory goes: during the warm-up step every tensor autograd saves for the backward is
tallied once (parameters excepted) by the innermost module whose forward made it (the loss's own
tensors as "loss"): the activations the step must hold at its peak, beside the weights, the gradients
and AdamW's state.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

from benchmarks.common import BenchArgs
from common.errors import run_cli
from common.flags import flag

WAYS = ("projected", "logits", "full")


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
    import contextlib
    import time

    import torch

    from data import load_records, make_synthetic
    from models import autocast, load_model_and_tokenizer
    from models.memory import SavedTally
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
    loss_fn = completion_loss_sum_full if args.worker == "full" else completion_loss_sum
    if args.worker == "logits":
        import models.logprobs

        models.logprobs.head_weight = lambda model: None  # the head's own logits, as for a LoRA or 4-bit head
    times = []
    for k, batch in enumerate(batches):
        if k == 1:
            _reset_peak(device)
        batch = {name: v.to(device) for name, v in batch.items()}
        t0 = time.perf_counter()
        with autocast(device), (SavedTally(model) if k == 0 else contextlib.nullcontext()) as tally:
            loss = loss_fn(model, batch) / int((batch["labels"][:, 1:] != -100).sum())
        if k == 0:
            saved = {name: b / 2**30 for name, b in tally.bytes.most_common()}
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if k > 0:
            times.append(time.perf_counter() - t0)
    cuda = device.startswith("cuda")
    trained_gb = sum(p.numel() * p.element_size() for p in params) / 2**30  # one gradient, two AdamW moments each
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else _rss_gb("VmHWM")
    return {"way": args.worker, "seconds_per_step": sorted(times)[len(times) // 2], "peak_memory_gb": peak,
            "weights_gb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30,
            "adamw_state_gb": 2 * trained_gb, "gradients_gb": trained_gb,
            "saved_gb": saved,
            "tokens_per_step": sum(int(b["attention_mask"].sum()) for b in batches[1:]) / len(batches[1:]),
            "vocab_size": model.config.vocab_size, "loss": loss.item()}


def main(argv: list[str] | None = None) -> None:
    from common.flags import parse_flags

    args, _ = parse_flags(SFTStepArgs, argv, __doc__, prog="python dev/sft_step.py")
    from models import default_device

    device = args.device or default_device()
    if args.worker:
        print("WORKER " + json.dumps(worker(args, device)))
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    runs: dict[str, list[dict]] = {way: [] for way in WAYS}
    for _ in range(args.repeats):
        for way in WAYS:
            done = subprocess.run([sys.executable, __file__, *argv, "--device", device,
                                   "--worker", way], capture_output=True, text=True)
            if done.returncode != 0:
                from common.errors import fail

                fail(f"the {way} SFT step failed: {done.stderr.strip().splitlines()[-1:]}")
            line = next(x for x in done.stdout.splitlines() if x.startswith("WORKER "))
            runs[way].append(json.loads(line[7:]))
    best = {way: min(r, key=lambda x: x["seconds_per_step"]) for way, r in runs.items()}
    first = best["projected"]
    record = {"benchmark": "sft_step", "model": args.model, "device": device, "lora": args.lora,
              "batch_size": args.batch_size, "tokens_per_step": first["tokens_per_step"],
              "vocab_size": first["vocab_size"], "weights_gb": round(first["weights_gb"], 3),
              "adamw_state_gb": round(first["adamw_state_gb"], 3), "repeats": args.repeats,
              **{f"{way}_seconds_per_step": round(best[way]["seconds_per_step"], 3) for way in WAYS},
              **{f"{way}_peak_memory_gb": round(best[way]["peak_memory_gb"], 3) for way in WAYS},
              "loss_difference": max(abs(best[way]["loss"] - best["full"]["loss"]) for way in WAYS),
              "speedup": round(best["full"]["seconds_per_step"] / best["projected"]["seconds_per_step"], 2)}
    print(f"{args.model}{' + LoRA' if args.lora else ''} on {device}: batch {args.batch_size}, "
          f"{first['tokens_per_step']:.0f} tokens/step, vocabulary {first['vocab_size']}; weights "
          f"{first['weights_gb']:.3f} GB, AdamW state {first['adamw_state_gb']:.3f} GB")
    for way in WAYS:
        way_best = best[way]
        saved = way_best["saved_gb"]
        top = ", ".join(f"{name} {gb:.3f}" for name, gb in list(saved.items())[:5])
        print(f"  {way + ':':<10} {way_best['seconds_per_step']:7.3f} s/step, "
              f"peak {way_best['peak_memory_gb']:.3f} GB; "
              f"saved for the backward {sum(saved.values()):.3f} GB (warm-up step: {top}), "
              f"gradients {way_best['gradients_gb']:.3f} GB")
        record[f"{way}_saved_gb"] = {name: round(gb, 6) for name, gb in saved.items()}
    print(f"  speedup:   {record['speedup']:.2f}x, projected against full (fastest process of {args.repeats} each)")
    print("JSON " + json.dumps(record))


if __name__ == "__main__":
    run_cli(main)
