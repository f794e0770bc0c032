"""GSM8K (or synthetic) accuracy of a checkpoint: `python -m eval --model <dir|hub id|tiny>`.

Greedy by default; with --num_samples k and --temperature T > 0 also pass@k (unbiased) and maj@k.
Writes <output>/eval_summary.json and <output>/eval_predictions.jsonl (one line per completion, to
read the failures). --output defaults to <model dir>/eval, or ./eval_results for a hub id.
Data-parallel: `torchrun --nproc_per_node N -m eval ...` splits the problems across N processes and
writes one summary and one predictions file.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from common.distributed import add_backend_argument, distributed_run
from common.errors import fail, run_cli
from common.flags import CUDA_GRAPHS, DEVICE, Rule, flag, parse_flags
from data import load_records, require_solutions
from data.flags import DataFlags
from data.prompt import MAX_PROMPT_LENGTH, check_thinking, clean_solution, resolve_format, warn_thinking
from rewards.harness import SCORINGS


@dataclass
class EvalArgs(DataFlags):
    model: str = flag("tiny", "model folder (SFT/GRPO output), hub id, or `tiny`", required=True)
    split: str = flag("test", "which split", choices=("train", "test"))
    max_samples: int | None = flag(None, "only the first N problems", low=1)
    batch_size: int = flag(32, "prompts per generation batch", low=1)
    max_new_tokens: int = flag(512, "token limit per completion", low=1)
    max_prompt_length: int = flag(MAX_PROMPT_LENGTH, "longer prompts are skipped and counted (prompts_skipped)",
                                  low=1)
    num_fewshot: int = flag(0, "K worked solutions from the dataset's train split as earlier chat turns (a fixed, "
                               "seeded choice, named in the summary), to compare with published few-shot scores",
                            low=0)
    num_samples: int = flag(1, "k completions per problem (needs --temperature > 0)", low=1)
    temperature: float = flag(0.0, "0: greedy", low=0)
    top_p: float = flag(1.0, "nucleus sampling threshold", above=0, high=1)
    top_k: int = flag(0, "sample only from the K most likely tokens (0: all)", low=0)
    min_p: float = flag(0.0, "sample only tokens at least this share of the most likely one's probability", low=0,
                        high=1)
    seed: int = flag(0, "sampling seed", low=0)
    output: str | None = flag(None, "folder for eval_summary.json and eval_predictions.jsonl")
    device: str | None = flag(None, "cpu, cuda ... (default: cuda when available)", text=DEVICE)
    cuda_graphs: str = flag("auto", "replay the decode step from CUDA graphs: auto (on CUDA with "
                                    "--static_batches), on (CUDA only; alone, --cuda_graphs is on) or off",
                            choices=CUDA_GRAPHS, bare="on")
    continuous: bool = flag(True, "continuous batching: rows take the next prompt as soon as their completion ends "
                                  "(off: static batches of --batch_size prompts)", name="--static_batches")
    show_progress: bool = flag(True, "a progress bar on a terminal", name="--no_progress")
    scoring: str = flag("numeric", "numeric: our reading (the last '####', numbers compared); harness: "
                                   "lm-evaluation-harness's gsm8k strict-match and flexible-extract to the letter "
                                   "(docs/eval.md), to compare with published figures", choices=SCORINGS)

    RULES: ClassVar[tuple[Rule, ...]] = (  # settings that contradict each other, checked with the ranges
        Rule(("num_samples", "temperature"), lambda c: c.num_samples > 1 and c.temperature <= 0 and (
            "--num_samples > 1 needs --temperature > 0 (greedy samples are all the same)")),
        Rule(("cuda_graphs", "device"), lambda c: _graphs_without_cuda(c)),
        Rule(("cuda_graphs", "continuous"), lambda c: c.cuda_graphs == "on" and c.continuous and (
            "continuous batching refills a batch's rows, which CUDA graphs cannot: drop --cuda_graphs on or pass "
            "--static_batches")),
    )


def _graphs_without_cuda(cfg: Any) -> str | None:
    """sampling.cuda_graphs' rule between --cuda_graphs and --device (a one-line error, or None)."""
    # sampling loads torch: imported here, when the rules are checked, so `python -m eval --help` stays fast
    from sampling.cuda_graphs import graphs_without_cuda

    return graphs_without_cuda(cfg)


FEWSHOT_SEED = 1234  # the few-shot examples are the same for every model and run


def fewshot(args: EvalArgs) -> tuple[list[tuple[str, str]], list[int]]:
    """K (question, worked solution) pairs from the train split, chosen by a fixed seed, and their indices."""
    if args.num_fewshot == 0:
        return [], []
    train = load_records(args.dataset, "train", args.data_dir, fields=args.fields())
    if len(train) < args.num_fewshot:
        fail(f"--num_fewshot {args.num_fewshot}: the train split has only {len(train)} problems")
    indices = sorted(random.Random(FEWSHOT_SEED).sample(range(len(train)), args.num_fewshot))
    chosen = [train[i] for i in indices]
    require_solutions(chosen, f"{args.dataset} (few-shot examples)", args.fields())
    return [(r["question"], clean_solution(r["solution"])) for r in chosen], indices


def main(argv: list[str] | None = None) -> None:
    args, parsed = parse_flags(EvalArgs, argv, __doc__, prog="python -m eval",
                               extra=lambda p: add_backend_argument(p.add_argument))
    import torch

    from eval.evaluate import evaluate, write_results
    from models import load_model_and_tokenizer, load_tokenizer
    from sampling import Sampler, SamplingParams
    from sampling.cuda_graphs import use_cuda_graphs

    fmt = resolve_format(args, args.model)
    check_thinking(fmt, args.model, load_tokenizer)
    warn_thinking(fmt, args.max_new_tokens, args.temperature <= 0, "eval")
    records = load_records(args.dataset, args.split, args.data_dir, args.max_samples, fields=args.fields())
    shots, shot_indices = fewshot(args)
    params = SamplingParams(num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p)
    with distributed_run(args.device, parsed.dist_backend) as (dist, device):
        graphs = use_cuda_graphs(args.cuda_graphs, device) and not (args.continuous and args.cuda_graphs == "auto")
        model, tokenizer = load_model_and_tokenizer(args.model, device=device)
        sampler = Sampler.for_tokenizer(model, tokenizer, batch_size=args.batch_size, continuous=args.continuous,
                                        cuda_graphs=graphs)
        torch.manual_seed(args.seed + dist.rank)
        summary, predictions = evaluate(sampler, tokenizer, records, params, show_progress=args.show_progress,
                                        max_prompt_length=args.max_prompt_length, shots=shots,
                                        prompt_format=fmt, scoring=args.scoring)
    if not dist.is_main:
        return
    summary.update(model=args.model, dataset=args.dataset, split=args.split, world_size=dist.world_size,
                   num_fewshot=args.num_fewshot, fewshot_seed=FEWSHOT_SEED, fewshot_train_indices=shot_indices,
                   continuous_batching=args.continuous)
    model_dir = Path(args.model)
    out = Path(args.output) if args.output else (model_dir / "eval" if model_dir.is_dir() else Path("eval_results"))
    write_results(out, summary, predictions)
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    print(f"wrote {out / 'eval_summary.json'} and {out / 'eval_predictions.jsonl'}")

if __name__ == "__main__":
    run_cli(main)
