"""The drift between the rollout engine's log-probs and the training forward's, on one model shape.

    python -m benchmarks.drift --model random:Qwen/Qwen3-0.6B --device cuda
    python -m benchmarks.drift --model tiny --device cpu --max_new_tokens 16

GRPO's ratio assumes the completions were drawn from the policy the loss evaluates; the engine is a
second implementation of the forward (the lean decode step, bf16 weight copies on CUDA, CUDA graphs).
This rolls out --prompts x --num_generations completions of exactly --max_new_tokens tokens as a GRPO
step does (fp32 master weights, the compute policy's bf16 autocast, the decode step in bf16), eagerly and,
on CUDA, replayed from CUDA graphs, then scores the same tokens with the training forward (the
no-grad log-prob pass of grpo/step.py, under the same autocast) and reports, for each rollout, what
the training log reports per step (grpo/loss.py's `sampler_drift`): sampler_kl (k3), the mean and max
|sampler - trainer| log-prob and the raw ratio's min, mean and max. It also reports the training
forward's own bf16 error (against an fp32 forward of the same tokens) and, on CUDA, the graphed rollout
against the eager one on the same draws (the share of rows with equal tokens, the largest |diff| of
their log-probs up to each row's first different token). On the CPU the same bf16 policy is forced
(`--precision bf16`: bf16 autocast and a bf16 decode step, as CUDA runs them) or left as the CPU trains
(`--precision fp32`). Nothing is written: no model, no checkpoint. Prints one JSON line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

import sampling.engine
from benchmarks.common import CompletionArgs
from common.errors import run_cli
from common.flags import flag
from grpo.loss import sampler_drift
from grpo.record import drift_fields


@dataclass
class DriftArgs(CompletionArgs):
    max_new_tokens: int = flag(256, "new tokens per sample (forced: every row runs to the end)", low=1)
    temperature: float = flag(0.7, "sampling temperature, also the log-probs' (GRPO's default)", above=0)
    top_p: float = flag(1.0, "nucleus threshold (a cut adds the log of the kept mass to the drift)", above=0, high=1)
    micro_batch_size: int = flag(4, "completions per training-forward pass", low=1)
    precision: str = flag("bf16", "bf16: the CUDA compute policy (bf16 autocast, a bf16 decode step), also on the "
                                  "CPU; fp32: no autocast, the decode step in the model's dtype (the CPU's policy)",
                          choices=("bf16", "fp32"))
    seed: int = flag(0, "seed of the draws", low=0)


def drift_of(trainer: Any, sampler: Any, mask: Any) -> dict[str, float]:
    """sampler_kl, sampler_logp_diff_mean/max, sampler_ratio_min/mean/max of [B, T] log-probs, as the
    training log computes them (grpo.loss.sampler_drift)."""
    stats = sampler_drift(trainer, sampler, mask)[1]
    values = {k: float(v) for k, v in stats.items()}
    fields = drift_fields(values, values, 1)
    return {k: v for k, v in fields.items() if k.startswith("sampler_")}


def graphed_against_eager(eager: Any, graphed: Any) -> dict[str, float]:
    """Two rollouts of the same prompts and draws (`Completions`): the share of rows whose tokens are
    equal, and the largest |difference| of their log-probs over each row's tokens up to its first
    different one (after it the rows hold different text)."""
    agree, diffs = 0, [0.0]
    for e_ids, g_ids, e_lp, g_lp in zip(eager.token_ids, graphed.token_ids, eager.logprobs, graphed.logprobs):
        n = next((j for j, (a, b) in enumerate(zip(e_ids, g_ids)) if a != b), min(len(e_ids), len(g_ids)))
        agree += e_ids == g_ids
        diffs += [abs(a - b) for a, b in zip(e_lp[:n], g_lp[:n])]
    return {"graphs_rows_equal_eager": agree / len(eager.token_ids), "graphs_vs_eager_diff_max": max(diffs)}


@contextlib.contextmanager
def decode_precision(bf16: bool, cuda: bool) -> Iterator[None]:
    """The decode step's dtype for the block: bf16 on CUDA already; on the CPU forced to bf16 (`bf16`) as
    the tests force it (tests/test_sampling.py), so the CPU measures what CUDA runs, or else the model's."""
    real = sampling.engine.decode_dtype
    if bf16 and not cuda:
        sampling.engine.decode_dtype = lambda model, device: torch.bfloat16
    elif not bf16:
        sampling.engine.decode_dtype = lambda model, device: next(model.parameters()).dtype
    try:
        yield
    finally:
        sampling.engine.decode_dtype = real


def main(argv: list[str] | None = None) -> None:
    from common.flags import parse_flags

    args, _ = parse_flags(DriftArgs, argv, __doc__, prog="python -m benchmarks.drift")

    import torch

    from benchmarks.common import print_json, prompts_for
    from grpo.batch import pack
    from grpo.step import logprobs_no_grad
    from models import default_device, load_model_and_tokenizer
    from sampling import Sampler, SamplingParams

    device = args.device or default_device()
    cuda = device.startswith("cuda")
    bf16 = args.precision == "bf16"
    # the model as GRPO's full fine-tune holds it: fp32 master weights (never saved)
    model, tokenizer = load_model_and_tokenizer(args.model, device=device, dtype=torch.float32)
    model.eval()
    prompts = prompts_for(tokenizer, args.prompts)
    params = SamplingParams(num_samples=args.num_generations, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, ignore_eos=True)

    def autocast() -> Any:
        return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16)

    record: dict[str, Any] = {
        "benchmark": "drift", "model": args.model, "device": device, "precision": args.precision,
        "prompts": len(prompts), "num_generations": args.num_generations, "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature, "top_p": args.top_p,
        "decode_dtype": "bfloat16" if bf16 else str(next(model.parameters()).dtype).removeprefix("torch."),
        "training_forward": "bf16 autocast" if bf16 else "fp32",
    }
    ways = {"eager": Sampler.for_tokenizer(model, tokenizer)}
    if cuda:
        ways["graphs"] = Sampler.for_tokenizer(model, tokenizer, cuda_graphs=True)
    rows, outs = {}, {}
    for name, sampler in ways.items():
        with autocast(), decode_precision(bf16, cuda):
            out = outs[name] = sampler.sample(prompts, params, generator=torch.Generator(device).manual_seed(args.seed))
        batch = pack([prompts[i] for i in out.prompt_index], out.token_ids, tokenizer.pad_token_id, device,
                     out.logprobs)
        trainer = logprobs_no_grad(model, batch, args.micro_batch_size, args.temperature, autocast)
        rows[name] = drift_of(trainer, batch.sampler_logprobs, batch.completion_mask)
        record.update({f"{name}_{k}": v for k, v in rows[name].items()})
        if name == "eager":  # the training forward's own bf16 error: against an fp32 forward of these tokens
            fp32 = logprobs_no_grad(model, batch, args.micro_batch_size, args.temperature, contextlib.nullcontext)
            own = drift_of(fp32, trainer, batch.completion_mask)
            record.update(forward_vs_fp32_kl=own["sampler_kl"], forward_vs_fp32_diff_mean=own["sampler_logp_diff_mean"],
                          forward_vs_fp32_diff_max=own["sampler_logp_diff_max"])
        if sampler.graphs is not None:
            record["graphs_failed"] = sampler.failed  # a capture that failed decodes eagerly: said, not hidden
            sampler.release()
    if "graphs" in outs:
        record.update(graphed_against_eager(outs["eager"], outs["graphs"]))
    record["tokens_per_rollout"] = len(prompts) * args.num_generations * args.max_new_tokens
    report(args, record, rows)
    print_json(record)


def report(args: DriftArgs, record: dict[str, Any], rows: dict[str, dict[str, float]]) -> None:
    """The human-readable lines above the JSON one: each rollout's drift, the training forward's own."""
    print(f"{args.model} on {record['device']}, {args.precision}: {record['tokens_per_rollout']} tokens per rollout, "
          f"decode in {record['decode_dtype']}, training forward {record['training_forward']}")
    for name, r in rows.items():
        print(f"  {name + ':':<8} sampler_kl {r['sampler_kl']:.3e}  |diff| mean {r['sampler_logp_diff_mean']:.3e} "
              f"max {r['sampler_logp_diff_max']:.3e}  ratio min {r['sampler_ratio_min']:.4f} "
              f"mean {r['sampler_ratio_mean']:.4f} max {r['sampler_ratio_max']:.4f}")
    print(f"  training forward against fp32: kl {record['forward_vs_fp32_kl']:.3e}  |diff| mean "
          f"{record['forward_vs_fp32_diff_mean']:.3e} max {record['forward_vs_fp32_diff_max']:.3e}")
    if "graphs_vs_eager_diff_max" in record:
        print(f"  graphed against eager (same draws): {100 * record['graphs_rows_equal_eager']:.0f}% of rows equal, "
              f"|diff| max {record['graphs_vs_eager_diff_max']:.3e} up to each row's first different token")

if __name__ == "__main__":
    run_cli(main)
