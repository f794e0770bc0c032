"""GRPO fine-tuning from scratch (no TRL): rollouts, group advantages, clipped loss, KL to a frozen reference.

Starts from the SFT model in --sft_output unless --model_name says otherwise. One JSONL line per step
in <grpo_output>/grpo_training_logs.jsonl.

Offline example (CPU, minutes), after the SFT offline example:
    python train_grpo.py --sft_output ./qwen_gsm8k_sft_tiny --grpo_output ./qwen_gsm8k_grpo_tiny \\
        --dataset synthetic --max_steps 40 --prompts_per_step 16 --num_generations 8 --micro_batch_size 64 \\
        --max_completion_length 48 --temperature 1.0 --beta 0 --learning_rate 5e-5
Real recipe (GPU): python train_grpo.py --data_dir ../shared/data/gsm8k --max_steps 500
Several GPUs: torchrun --standalone --nproc_per_node 4 train_grpo.py ... --prompts_per_step 16
    (--prompts_per_step is the global count, split across processes; groups never span processes)
"""

from __future__ import annotations

import argparse

from common.distributed import add_backend_argument
from common.errors import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    g = p.add_argument_group("model and data")
    g.add_argument("--sft_output", default="./qwen_gsm8k_sft", help="SFT model folder to start from")
    g.add_argument("--model_name", default=None, help="start from this instead: hub id, folder, or `tiny`")
    g.add_argument("--grpo_output", default="./qwen_gsm8k_grpo", help="output folder: model, checkpoint, logs")
    g.add_argument("--dataset", default="gsm8k", choices=["gsm8k", "synthetic"], help="prompts (synthetic: offline)")
    g.add_argument("--data_dir", default=None, help="folder with GSM8K's jsonl files (default: $GSM8K_DIR, else hub)")
    g.add_argument("--max_samples", type=int, default=None, help="use only the first N training prompts")
    g = p.add_argument_group("length of the run")
    g.add_argument("--max_steps", type=int, default=None, help="optimizer steps (rollouts); overrides --num_epochs")
    g.add_argument("--num_epochs", type=float, default=1.0, help="passes over the prompts when --max_steps is unset")
    g = p.add_argument_group("rollout")
    g.add_argument("--prompts_per_step", type=int, default=4, help="prompts per step")
    g.add_argument("--num_generations", type=int, default=4, help="G: samples per prompt (a group)")
    g.add_argument("--max_completion_length", type=int, default=512,
                   help="token limit per completion; untuned Qwen3-0.6B needs ~250 on GSM8K, so keep 512")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (also used in logprobs)")
    g.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling threshold")
    g.add_argument("--cuda_graphs", action="store_true",
                   help="replay the decode step from CUDA graphs (CUDA only; see README, Speed)")
    g = p.add_argument_group("loss and optimizer")
    g.add_argument("--micro_batch_size", type=int, default=4, help="completions per forward/backward pass")
    g.add_argument("--learning_rate", type=float, default=1e-6, help="AdamW learning rate")
    g.add_argument("--lr_decay", default="constant", choices=["constant", "cosine", "linear"], help="after warmup")
    g.add_argument("--warmup_ratio", type=float, default=0.0, help="share of updates with linear LR warmup")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the gradient norm to this")
    g.add_argument("--beta", type=float, default=0.01, help="KL coefficient; 0 skips the reference model")
    g.add_argument("--epsilon", type=float, default=0.2, help="clip range: ratio in [1-eps, 1+eps_high]")
    g.add_argument("--epsilon_high", type=float, default=None, help="upper clip (default: --epsilon)")
    g.add_argument("--loss_type", default="dapo", choices=["grpo", "bnpo", "dr_grpo", "dapo"],
                   help="token aggregation (see README)")
    g.add_argument("--scale_rewards", default="group", choices=["group", "batch", "none"],
                   help="divide advantages by the group's std, the batch's, or not")
    g.add_argument("--num_iterations", type=int, default=1, help="mu: updates per rollout (old logprobs kept)")
    g = p.add_argument_group("memory")
    g.add_argument("--lora", action="store_true", help="train LoRA adapters (reference = adapter disabled)")
    g.add_argument("--lora_r", type=int, default=16, help="LoRA rank")
    g.add_argument("--lora_alpha", type=int, default=32, help="LoRA alpha")
    g.add_argument("--use_4bit", action="store_true", help="4-bit NF4 base (with --lora), e.g. Qwen3-4B on 24 GB")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    g = p.add_argument_group("run")
    a("--seed", type=int, default=42, help="seed for prompt order and sampling")
    a("--save_every", type=int, default=50, help="checkpoint every N steps (and at the end)")
    a("--eval_every", type=int, default=0, help="held-out greedy accuracy every N steps (0: never)")
    a("--eval_samples", type=int, default=100, help="held-out problems (test split) per eval")
    a("--eval_max_new_tokens", type=int, default=None, help="eval token limit (default --max_completion_length)")
    a("--resume", action="store_true", help="continue the run in --grpo_output from its checkpoint")
    a("--overwrite", action="store_true", help="replace whatever --grpo_output holds")
    a("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    add_backend_argument(a)
    a("--no_progress", action="store_true", help="no progress bar (the log is still written)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from common.distributed import distributed_run
    from grpo.trainer import GRPOConfig, train_grpo

    kwargs = vars(args)
    kwargs["show_progress"] = not kwargs.pop("no_progress")
    with distributed_run(kwargs.pop("device"), kwargs.pop("dist_backend")) as (_, device):
        train_grpo(GRPOConfig(**kwargs, device=device))


if __name__ == "__main__":
    run_cli(main)
