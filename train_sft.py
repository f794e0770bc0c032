"""Supervised LoRA fine-tuning that teaches the `#### N` answer format and when to stop.

Every flag and its allowed range is declared once, in sft/config.py.

Offline example (CPU, minutes):
    python train_sft.py --model_name tiny --dataset synthetic --sft_output ./qwen_gsm8k_sft_tiny \\
        --num_epochs 1 --batch_size 32 --learning_rate 3e-3
Real recipe (GPU):
    python train_sft.py --model_name Qwen/Qwen3-0.6B --data_dir ../shared/data/gsm8k
Several GPUs: torchrun --standalone --nproc_per_node 4 train_sft.py ...
    (--batch_size is per process: one optimizer step sees batch_size x grad_accum x processes examples)
"""

from __future__ import annotations

from common.errors import run_cli


def main(argv: list[str] | None = None) -> None:
    from common.cli import run_training
    from sft.config import SFTConfig
    from sft.trainer import train_sft

    run_training(SFTConfig, train_sft, __doc__, argv)


if __name__ == "__main__":
    run_cli(main)
