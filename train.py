"""The seed's interface: `python3 train.py --mode sft|grpo|both|eval` over train_sft.py, train_grpo.py and eval.

    python3 train.py --mode both --model_name Qwen/Qwen3-0.6B --num_epochs 3 --batch_size 4
    python3 train.py --mode eval --grpo_output ./qwen_gsm8k_grpo
With --mode sft, grpo or eval, other flags go to that stage unchanged (e.g. --max_steps, --beta);
--mode both takes only the flags below (run the stages one by one for more control).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import fail, run_cli


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", required=True, choices=["sft", "grpo", "both", "eval"], help="which stage(s) to run")
    p.add_argument("--model_name", default=None, help="SFT base model (default Qwen/Qwen3-0.6B); GRPO/eval: override")
    p.add_argument("--sft_output", default="./qwen_gsm8k_sft", help="SFT output; GRPO starts from it")
    p.add_argument("--grpo_output", default="./qwen_gsm8k_grpo", help="GRPO output")
    p.add_argument("--num_epochs", type=int, default=None, help="epochs (SFT; GRPO: passes over the prompts)")
    p.add_argument("--batch_size", type=int, default=None, help="SFT batch size / GRPO micro-batch size")
    p.add_argument("--use_4bit", action="store_true", help="4-bit NF4 base: QLoRA SFT, LoRA GRPO")
    p.add_argument("--max_samples", type=int, default=None, help="first N training examples (eval: problems)")
    p.add_argument("--dataset", default=None, choices=["gsm8k", "synthetic"], help="data for every stage")
    p.add_argument("--data_dir", default=None, help="GSM8K folder for every stage")
    args, rest = p.parse_known_args(argv)
    if rest and args.mode == "both":
        fail(f"--mode both does not take {' '.join(rest)}; run --mode sft and --mode grpo separately for those")

    def opt(flag: str, value) -> list[str]:
        return [] if value is None else [flag, str(value)]

    data = opt("--dataset", args.dataset) + opt("--data_dir", args.data_dir)
    if args.mode in ("sft", "both"):
        import train_sft

        train_sft.main([*opt("--model_name", args.model_name), "--sft_output", args.sft_output, *data,
                        *opt("--num_epochs", args.num_epochs), *opt("--max_samples", args.max_samples),
                        *opt("--batch_size", args.batch_size), *(["--use_4bit"] if args.use_4bit else []), *rest])
    if args.mode in ("grpo", "both"):
        import train_grpo

        train_grpo.main(["--sft_output", args.sft_output, "--grpo_output", args.grpo_output, *data,
                         *opt("--model_name", args.model_name if args.mode == "grpo" else None),
                         *opt("--num_epochs", args.num_epochs), *opt("--max_samples", args.max_samples),
                         *opt("--micro_batch_size", args.batch_size),
                         *(["--lora", "--use_4bit"] if args.use_4bit else []), *(rest if args.mode == "grpo" else [])])
    if args.mode == "eval":
        from eval.__main__ import main as eval_main

        model = args.model_name or (args.grpo_output if (Path(args.grpo_output) / "config.json").is_file()
                                    else args.sft_output)
        eval_main(["--model", model, *data, *opt("--max_samples", args.max_samples), *rest])


if __name__ == "__main__":
    run_cli(main)
