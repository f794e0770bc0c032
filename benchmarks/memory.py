"""The GRPO step's GPU memory ledger, per phase, computed on the CPU: will the recipe fit?

    python -m benchmarks.memory                                     (Qwen3-0.6B, the default recipe)
    python -m benchmarks.memory --finetune lora --cuda_graphs
    python -m benchmarks.memory --model random:Qwen/Qwen3-4B --finetune lora --use_4bit
    python -m benchmarks.memory --model tiny --prompt_tokens 40 --completion_tokens 32

The ledger itself (what each line counts, and the check every CUDA run makes with it before loading)
is grpo/memory.py's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from benchmarks.common import BenchArgs
from common.flags import FINETUNE, flag
from grpo.config import GRPOConfig


def _recipe(name: str) -> Any:
    """train_grpo.py's default for `name`: the ledger's defaults are the recipe's."""
    return next(f.default for f in fields(GRPOConfig) if f.name == name)


@dataclass
class MemoryArgs(BenchArgs):
    model: str = flag("random:Qwen/Qwen3-0.6B", "the model: random:<hub id>, tiny, a folder or a cached hub id")
    finetune: str = flag(_recipe("finetune"), "full or lora, as train_grpo.py --finetune", choices=FINETUNE)
    use_4bit: bool = flag(False, "a 4-bit NF4 base under LoRA, as train_grpo.py --use_4bit")
    prompts_per_step: int = flag(_recipe("prompts_per_step"), "prompts per step", low=1)
    num_generations: int = flag(_recipe("num_generations"), "completions per prompt", low=1)
    micro_batch_size: int = flag(_recipe("micro_batch_size"), "completions per forward/backward pass", low=1)
    prompt_tokens: int = flag(150, "prompt length (GSM8K's prompts: ~100-250 tokens)", low=1)
    completion_tokens: int = flag(_recipe("max_completion_length"), "completion length: "
                                  "--max_completion_length, the worst case", low=1)
    beta: float = flag(_recipe("beta"), "the KL coefficient: > 0 holds a frozen reference (without LoRA)", low=0)
    lora_r: int = flag(_recipe("lora_r"), "LoRA rank", low=1)
    cuda_graphs: bool = flag(False, "the graphed decode state stays through the backward")
    gradient_checkpointing: bool = flag(False, "recompute activations in the backward")


def main(argv: list[str] | None = None) -> None:
    from common.errors import fail
    from common.flags import parse_flags
    from grpo.memory import ledger

    args, _ = parse_flags(MemoryArgs, argv, __doc__, prog="python -m benchmarks.memory")
    if args.use_4bit and args.finetune != "lora":
        fail("--use_4bit trains LoRA adapters on a frozen 4-bit base; add --finetune lora")
    figures = {k: round(v, 3) for k, v in ledger(args).items()}
    print(f"{args.model}, {args.finetune} fine-tuning{' on a 4-bit base' if args.use_4bit else ''}, "
          f"{args.prompts_per_step} x {args.num_generations} rows of {args.prompt_tokens} + {args.completion_tokens} "
          f"tokens, micro-batch {args.micro_batch_size}"
          f"{', CUDA graphs' if args.cuda_graphs else ''}{', checkpointing' if args.gradient_checkpointing else ''}:")
    for key, value in figures.items():
        print(f"  {key:18s} {value:8.3f} GB")
    print("JSON " + json.dumps({"benchmark": "memory", "model": args.model, "finetune": args.finetune,
                                "use_4bit": args.use_4bit, "cuda_graphs": args.cuda_graphs, **figures}))


if __name__ == "__main__":
    from common.errors import run_cli

    run_cli(main)
