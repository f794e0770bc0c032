"""Every stage from one command: `python3 train.py --mode sft|grpo|both|eval` over train_sft.py,
train_grpo.py and eval.

    python3 train.py --mode both --model_name Qwen/Qwen3-0.6B --num_epochs 3 --batch_size 4
    python3 train.py --mode eval --grpo_output ./qwen_gsm8k_grpo
    python3 train.py --mode both --model_name tiny --dataset synthetic --max_steps 5
    python3 train.py --mode both --model_name tiny --sft_max_steps 400 --grpo_max_steps 150
With --mode sft, grpo or eval, other flags go to that stage unchanged (e.g. --beta);
--mode both takes only the flags below (run the stages one by one for more control).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from common.errors import fail, run_cli
from data import DATASETS


def main(argv: list[str] | None = None) -> None:
    from common.flags import OneLineParser, add_flag_of

    def fields(cls: type) -> dict:
        return {f.name: f for f in dataclasses.fields(cls)}
    from grpo.config import GRPOConfig
    from sft.config import SFTConfig

    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", required=True, choices=["sft", "grpo", "both", "eval"], help="which stage(s) to run")
    add_flag_of(p, SFTConfig, "model_name", "SFT base model (default Qwen/Qwen3-0.6B); GRPO/eval: override")
    add_flag_of(p, SFTConfig, "sft_output", "SFT output; GRPO starts from it (default ./qwen_gsm8k_sft)")
    add_flag_of(p, GRPOConfig, "grpo_output", "GRPO output (default ./qwen_gsm8k_grpo)")
    add_flag_of(p, SFTConfig, "num_epochs", "epochs (SFT; GRPO: passes over the prompts)")
    add_flag_of(p, SFTConfig, "batch_size", "SFT batch size / GRPO micro-batch size")
    add_flag_of(p, SFTConfig, "use_4bit", "4-bit NF4 base: QLoRA SFT, LoRA GRPO")
    add_flag_of(p, SFTConfig, "max_samples", "first N training examples (eval: problems)")
    add_flag_of(p, SFTConfig, "dataset", "data for every stage: " + ", ".join(DATASETS) + ", a file, a folder or "
                                         "a hub dataset id")
    for name in ("data_dir", "question_field", "answer_field", "solution_field"):
        add_flag_of(p, SFTConfig, name, f"for every stage: {fields(SFTConfig)[name].metadata['flag']['help']}")
    add_flag_of(p, SFTConfig, "max_steps", "optimizer steps of each training stage (SFT and GRPO)")
    # each stage's own length, as TRL users size a two-stage run; it wins over --max_steps for its stage
    for stage in ("sft", "grpo"):
        p.add_argument(f"--{stage}_max_steps", type=int, default=None,
                       help=f"{stage.upper()}'s optimizer steps (--mode {stage} or both; default --max_steps)")
    add_flag_of(p, SFTConfig, "seed", "seed of every stage")
    args, rest = p.parse_known_args(argv)
    if rest and args.mode == "both":
        fail(f"--mode both does not take {' '.join(rest)}; run --mode sft and --mode grpo separately for those")
    steps = {}
    for stage in ("sft", "grpo"):
        own = getattr(args, f"{stage}_max_steps")
        if own is not None and args.mode not in (stage, "both"):
            fail(f"--{stage}_max_steps sizes {stage.upper()}, which --mode {args.mode} does not run; drop it")
        if own is not None and own < 1:
            fail(f"--{stage}_max_steps must be >= 1 (got {own})")
        steps[stage] = own if own is not None else args.max_steps
    if args.mode == "eval" and args.max_steps is not None:
        fail("--mode eval trains nothing: drop --max_steps (--max_samples evaluates fewer problems)")

    def opt(flag: str, value) -> list[str]:
        return [] if value is None else [flag, str(value)]

    data = [x for name in ("dataset", "data_dir", "question_field", "answer_field", "solution_field")
            for x in opt(f"--{name}", getattr(args, name))]
    if args.mode in ("sft", "both"):
        import train_sft

        train_sft.main([*opt("--model_name", args.model_name), *opt("--sft_output", args.sft_output), *data,
                        *opt("--num_epochs", args.num_epochs), *opt("--max_samples", args.max_samples),
                        *opt("--batch_size", args.batch_size), *(["--use_4bit"] if args.use_4bit else []),
                        *opt("--max_steps", steps["sft"]), *opt("--seed", args.seed), *rest])
    if args.mode in ("grpo", "both"):
        import train_grpo

        train_grpo.main([*opt("--sft_output", args.sft_output), *opt("--grpo_output", args.grpo_output), *data,
                         *opt("--model_name", args.model_name if args.mode == "grpo" else None),
                         *opt("--num_epochs", args.num_epochs), *opt("--max_samples", args.max_samples),
                         *opt("--micro_batch_size", args.batch_size),
                         *(["--finetune", "lora", "--use_4bit"] if args.use_4bit else []),
                         *opt("--max_steps", steps["grpo"]), *opt("--seed", args.seed),
                         *(rest if args.mode == "grpo" else [])])
    if args.mode == "eval":
        from eval.__main__ import main as eval_main

        grpo_output, sft_output = args.grpo_output or GRPOConfig.grpo_output, args.sft_output or SFTConfig.sft_output
        model = args.model_name or (grpo_output if (Path(grpo_output) / "config.json").is_file() else sft_output)
        eval_main(["--model", model, *data, *opt("--max_samples", args.max_samples), *opt("--seed", args.seed), *rest])


if __name__ == "__main__":
    run_cli(main)
