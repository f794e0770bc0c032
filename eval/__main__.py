"""GSM8K (or synthetic) accuracy of a checkpoint: `python -m eval --model <dir|hub id|tiny>`.

Greedy by default; with --num_samples k and --temperature T > 0 also pass@k (unbiased) and maj@k.
Writes <output>/eval_summary.json and <output>/eval_predictions.jsonl (one line per completion, to
read the failures). --output defaults to <model dir>/eval, or ./eval_results for a hub id.
Data-parallel: `torchrun --nproc_per_node N -m eval ...` splits the problems across N processes and
writes one summary and one predictions file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.distributed import add_backend_argument
from common.errors import fail, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (SFT/GRPO output), hub id, or `tiny`")
    p.add_argument("--dataset", default="gsm8k", choices=["gsm8k", "synthetic"], help="problems to solve")
    p.add_argument("--data_dir", default=None, help="folder with GSM8K's jsonl files (default: $GSM8K_DIR, else hub)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="which split")
    p.add_argument("--max_samples", type=int, default=None, help="only the first N problems")
    p.add_argument("--batch_size", type=int, default=32, help="prompts per generation batch")
    p.add_argument("--max_new_tokens", type=int, default=512, help="token limit per completion")
    p.add_argument("--num_samples", type=int, default=1, help="k completions per problem (needs --temperature > 0)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--output", default=None, help="folder for eval_summary.json and eval_predictions.jsonl")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    p.add_argument("--cuda_graphs", action="store_true", help="replay the decode step from CUDA graphs (CUDA only)")
    add_backend_argument(p.add_argument)
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.num_samples > 1 and args.temperature <= 0:
        fail("--num_samples > 1 needs --temperature > 0 (greedy samples are all the same)")
    import torch

    from common.distributed import distributed_run
    from data import load_records
    from eval.evaluate import evaluate, write_results
    from models import load_model_and_tokenizer
    from sampling.cuda_graphs import check_cuda_graphs

    records = load_records(args.dataset, args.split, args.data_dir, args.max_samples)
    with distributed_run(args.device, args.dist_backend) as (dist, device):
        check_cuda_graphs(args.cuda_graphs, device)
        model, tokenizer = load_model_and_tokenizer(args.model, device=device)
        torch.manual_seed(args.seed + dist.rank)
        summary, predictions = evaluate(model, tokenizer, records, batch_size=args.batch_size,
                                        max_new_tokens=args.max_new_tokens, num_samples=args.num_samples,
                                        temperature=args.temperature, top_p=args.top_p,
                                        show_progress=not args.no_progress, cuda_graphs=args.cuda_graphs)
    if not dist.is_main:
        return
    summary.update(model=args.model, dataset=args.dataset, split=args.split, world_size=dist.world_size)
    model_dir = Path(args.model)
    out = Path(args.output) if args.output else (model_dir / "eval" if model_dir.is_dir() else Path("eval_results"))
    write_results(out, summary, predictions)
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    print(f"wrote {out / 'eval_summary.json'} and {out / 'eval_predictions.jsonl'}")

if __name__ == "__main__":
    run_cli(main)
