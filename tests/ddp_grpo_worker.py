"""One GRPO optimizer step on fixed completions, for the DDP equivalence test (tests/test_distributed.py).

    torchrun --standalone --nproc_per_node 2 tests/ddp_grpo_worker.py OUT_ROOT

runs every case of CASES into OUT_ROOT/<case>; the test runs the same cases in one process and compares
the updated weights. Each rank also writes OUT_ROOT/paths_<rank>.json: for each log-prob pass under DDP,
whether the loss projected the hidden states itself (no [B, C, V] logits). The completions come from
`fixed_completions`, a pure function of the prompt, so both runs train on exactly the same tokens
whatever the split of prompts across ranks.
"""

from __future__ import annotations

import os
import sys
import zlib
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

# two cases correct by the stand-in sampler log-probs of `fixed_completions` (per token and per completion)
CORRECTION = {"dapo_full": "token_mask", "grpo_lora": "sequence_truncate"}
CASES = {f"{loss}_{finetune}": dict(loss_type=loss, finetune=finetune,
                                    rollout_correction=CORRECTION.get(f"{loss}_{finetune}", "none"))
         for loss in ("dapo", "grpo") for finetune in ("full", "lora")}
G = 2


def fixed_completions(tokenizer, prompts: list[list[int]], answers: list[str]) -> list[list[int]]:
    """G completions per prompt: even samples answer right, odd ones wrong, with prompt-seeded filler of
    varying length (so token counts differ across rows and ranks)."""
    out = []
    for prompt, answer in zip(prompts, answers):
        seed = zlib.crc32(str(prompt).encode())
        for g in range(G):
            filler = " ".join(["so", "we", "add", "then", "take"][(seed + g + k) % 5] for k in range(seed % 7 + 3 * g))
            number = answer if g % 2 == 0 else str(int(float(answer.replace(",", ""))) + 1)
            text = f"{filler} #### {number}"
            out.append(tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id])
    return out


def sampler_logprobs(rows: list[list[int]]) -> list[list[float]]:
    """Stand-in sampler log-probs near the tiny model's (about -6.3 a token at temperature 1), a third
    of them 0.9 lower: ratios of about 2.5 there (over the cap of 2), about 1 elsewhere."""
    return [[-6.3 - (0.9 if (t + j) % 3 == 0 else 0.0) for j, t in enumerate(row)] for row in rows]


def run_case(out_dir: Path, loss_type: str, finetune: str, rollout_correction: str = "none") -> None:
    from grpo.trainer import GRPOConfig, train_grpo
    from models import load_tokenizer
    from sampling import Completions

    tokenizer = load_tokenizer("tiny")

    def hook(step, prompts, answers):
        rows = fixed_completions(tokenizer, prompts, answers)
        return Completions([i // G for i in range(len(rows))], rows, [False] * len(rows), sampler_logprobs(rows))

    cfg = GRPOConfig(model_name="tiny", dataset="synthetic", grpo_output=str(out_dir), max_steps=1,
                     prompts_per_step=4, num_generations=G, micro_batch_size=2, max_completion_length=32,
                     learning_rate=1e-3, beta=0.04, loss_type=loss_type, finetune=finetune, lora_r=4, lora_alpha=8,
                     temperature=1.0, save_every=10**9, device="cpu", show_progress=False, overwrite=True, seed=3,
                     log_completions="all", rollout_correction=rollout_correction)
    train_grpo(cfg, rollout=hook)


def main() -> None:
    import json

    import torch

    import grpo.batch
    from common.distributed import distributed_run

    root = Path(sys.argv[1])
    real, projected = grpo.batch.head_weight, []

    def recorded(model):
        weight = real(model)
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            projected.append(weight is not None)
        return weight

    grpo.batch.head_weight = recorded
    with distributed_run("cpu") as (dist, _):
        for name, case in CASES.items():
            run_case(root / name, **case)
        (root / f"paths_{dist.rank}.json").write_text(json.dumps(projected))


if __name__ == "__main__":
    main()
