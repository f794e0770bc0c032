"""GRPO fine-tuning from scratch (no TRL): rollouts, group advantages, clipped loss, KL to a frozen reference.

Starts from the SFT model in --sft_output unless --model_name says otherwise. One JSONL line per step
in <grpo_output>/grpo_training_logs.jsonl. Every flag and its allowed range is declared once, in
grpo/config.py.

Offline example (CPU, minutes), after the SFT offline example:
    python train_grpo.py --sft_output ./qwen_gsm8k_sft_tiny --grpo_output ./qwen_gsm8k_grpo_tiny \\
        --dataset synthetic --max_steps 40 --prompts_per_step 16 --num_generations 8 --micro_batch_size 64 \\
        --max_completion_length 48 --temperature 1.0 --beta 0 --learning_rate 5e-5
Real recipe (GPU): python train_grpo.py --data_dir ../shared/data/gsm8k --max_steps 500
Several GPUs: torchrun --standalone --nproc_per_node 4 train_grpo.py ... --prompts_per_step 16
    (--prompts_per_step is the global count, split across processes; groups never span processes)
"""

from __future__ import annotations

from common.errors import run_cli


def main(argv: list[str] | None = None) -> None:
    from common.cli import run_training
    from grpo.config import GRPOConfig
    from grpo.trainer import train_grpo

    run_training(GRPOConfig, train_grpo, __doc__, argv)


if __name__ == "__main__":
    run_cli(main)
