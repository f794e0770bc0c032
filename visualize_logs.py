r"""Plot a training log: losses.png, rewards.png, timing.png, tokens.png, and a console summary; or
several runs on one figure (compare.png) to see which is better.

    python visualize_logs.py --log_file ./qwen_gsm8k_grpo/grpo_training_logs.jsonl --output ./plots
    python visualize_logs.py --log_file runs/a/grpo_training_logs.jsonl runs/b/grpo_training_logs.jsonl \
        --labels full lora --output ./plots
Accepts GRPO logs and SFT logs (sft_training_logs.jsonl: loss, learning rate, grad norm, eval).
"""

from __future__ import annotations

import argparse

from common.errors import run_cli
from common.flags import OneLineParser


def main(argv: list[str] | None = None) -> None:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log_file", nargs="+", default=["./qwen_gsm8k_grpo/grpo_training_logs.jsonl"],
                   help="a training JSONL log, or several to compare on one figure")
    p.add_argument("--labels", nargs="+", default=None, help="with several logs: their names (default: folders)")
    p.add_argument("--output", default="./plots", help="folder for the PNGs")
    args = p.parse_args(argv)
    if len(args.log_file) > 1:
        from viz.compare import compare_files

        compare_files(args.log_file, args.labels, args.output)
        return
    from viz.plots import visualize

    visualize(args.log_file[0], args.output)


if __name__ == "__main__":
    run_cli(main)
