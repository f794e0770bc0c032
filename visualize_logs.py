"""Plot a training log: losses.png, rewards.png, timing.png, tokens.png, and a console summary.

    python visualize_logs.py --log_file ./qwen_gsm8k_grpo/grpo_training_logs.jsonl --output ./plots
Accepts GRPO logs and SFT logs (sft_training_logs.jsonl: loss, learning rate, grad norm, eval).
"""

from __future__ import annotations

import argparse

from common.errors import run_cli
from common.flags import OneLineParser


def main(argv: list[str] | None = None) -> None:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log_file", default="./qwen_gsm8k_grpo/grpo_training_logs.jsonl", help="a training JSONL log")
    p.add_argument("--output", default="./plots", help="folder for the four PNGs")
    args = p.parse_args(argv)
    from viz.plots import visualize

    visualize(args.log_file, args.output)


if __name__ == "__main__":
    run_cli(main)
