"""Supervised LoRA fine-tuning that teaches the `#### N` answer format and when to stop.

Offline example (CPU, minutes):
    python train_sft.py --model_name tiny --dataset synthetic --sft_output ./qwen_gsm8k_sft_tiny \\
        --num_epochs 1 --batch_size 32 --learning_rate 3e-3
Real recipe (GPU):
    python train_sft.py --model_name Qwen/Qwen3-0.6B --data_dir ../shared/data/gsm8k
Several GPUs: torchrun --standalone --nproc_per_node 4 train_sft.py ...
    (--batch_size is per process: one optimizer step sees batch_size x grad_accum x processes examples)
"""

from __future__ import annotations

import argparse

from common.distributed import add_backend_argument
from common.errors import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model_name", default="Qwen/Qwen3-0.6B", help="hub id, local folder, or `tiny` (built-in, offline)")
    a("--sft_output", default="./qwen_gsm8k_sft", help="output folder: merged model + tokenizer, adapter/, logs")
    a("--dataset", default="gsm8k", choices=["gsm8k", "synthetic"], help="training data (synthetic: offline)")
    a("--data_dir", default=None, help="folder with GSM8K's train.jsonl/test.jsonl (default: $GSM8K_DIR, else hub)")
    a("--max_samples", type=int, default=None, help="use only the first N training examples")
    a("--num_epochs", type=int, default=3, help="passes over the training set")
    a("--max_steps", type=int, default=None, help="stop after N optimizer steps (overrides epochs when fewer)")
    a("--batch_size", type=int, default=4, help="examples per micro-batch")
    a("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--learning_rate", type=float, default=2e-4, help="peak AdamW learning rate")
    a("--lr_decay", default="cosine", choices=["cosine", "linear", "constant"], help="decay after warmup")
    a("--warmup_ratio", type=float, default=0.03, help="share of steps with linear LR warmup")
    a("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    a("--full_finetune", action="store_true", help="train all weights instead of LoRA adapters")
    a("--lora_r", type=int, default=16, help="LoRA rank")
    a("--lora_alpha", type=int, default=32, help="LoRA scaling alpha")
    a("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA input")
    a("--max_length", type=int, default=512, help="truncate prompt+target to this many tokens")
    a("--keep_calculator", action="store_true", help="keep GSM8K's <<a*b=c>> annotations in the target")
    a("--use_4bit", action="store_true", help="QLoRA: load the base model in 4-bit NF4 (bitsandbytes)")
    a("--gradient_checkpointing", action="store_true", help="recompute activations to save memory")
    a("--seed", type=int, default=42, help="seed for data order, dropout and sampling")
    a("--eval_every", type=int, default=0, help="held-out eval every N steps and before training (0: end only)")
    a("--eval_samples", type=int, default=100, help="held-out problems (test split) for the eval")
    a("--eval_max_new_tokens", type=int, default=256, help="token limit of eval completions")
    a("--eval_batch_size", type=int, default=32, help="prompts per eval generate call")
    a("--save_every", type=int, default=100, help="checkpoint every N optimizer steps (and at the end)")
    a("--resume", action="store_true", help="continue the run in --sft_output from its last checkpoint")
    a("--overwrite", action="store_true", help="replace whatever --sft_output holds")
    a("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    add_backend_argument(a)
    a("--no_progress", action="store_true", help="no progress bars (logs still written)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from common.distributed import distributed_run
    from sft.trainer import SFTConfig, train_sft

    kwargs = vars(args)
    kwargs["show_progress"] = not kwargs.pop("no_progress")
    with distributed_run(kwargs.pop("device"), kwargs.pop("dist_backend")) as (_, device):
        train_sft(SFTConfig(**kwargs, device=device))


if __name__ == "__main__":
    run_cli(main)
