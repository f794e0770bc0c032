"""The GRPO step's GPU memory ledger, per phase, computed on the CPU: will the recipe fit?

    python -m benchmarks.memory                                     (Qwen3-0.6B, the default recipe)
    python -m benchmarks.memory --finetune lora --cuda_graphs
    python -m benchmarks.memory --model tiny --prompt_tokens 40 --completion_tokens 32

What is held all step long is counted from the model's shapes under CUDA's dtype policy (fp32 master
weights, gradients and AdamW moments for what trains; a bf16 frozen reference at --beta > 0 without
LoRA). The rollout holds bf16 decode copies of the weights, the KV cache of every row and a step's
logits; with --cuda_graphs those copies and the cache stay through the backward. The training
micro-batch holds what autograd saves for its backward: tallied on the CPU by a saved-tensor hook over
a real forward and backward of the step's own loss (the projected log-probs, under bf16 autocast) at
the recipe's sequence lengths, on 1 and 2 layers of the model's shape, then scaled to its depth (every
layer saves the same). The peak is what is held all step plus the larger of the two phases; it leaves
out the CUDA context and the caching allocator's fragmentation (`peak_memory_reserved_gb` on a GPU).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from benchmarks.common import BenchArgs, shape_config, shape_model
from common.flags import FINETUNE, flag

GB = 2**30


def _recipe(name: str) -> Any:
    """train_grpo.py's default for `name`: the ledger's defaults are the recipe's."""
    from grpo.config import GRPOConfig

    return next(f.default for f in fields(GRPOConfig) if f.name == name)


@dataclass
class MemoryArgs(BenchArgs):
    model: str = flag("random:Qwen/Qwen3-0.6B", "the model shape: random:<hub id> or tiny")
    finetune: str = flag(_recipe("finetune"), "full or lora, as train_grpo.py --finetune", choices=FINETUNE)
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


def saved_bytes(args: MemoryArgs, layers: int) -> int:
    """Bytes autograd saves over one training micro-batch's forward (the projected loss included)."""
    import torch

    from benchmarks.sft_step import SavedTally
    from grpo.batch import completion_logprobs, pack
    from grpo.loss import grpo_loss
    from models.lora import add_lora

    model = shape_model(args.model, layers)
    if args.finetune == "lora":
        model = add_lora(model, args.lora_r, 2 * args.lora_r, 0.0, args.gradient_checkpointing)
    elif args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    rows, vocab = args.micro_batch_size, model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (args.prompt_tokens,), generator=g).tolist()
    completions = [torch.randint(3, vocab, (args.completion_tokens,), generator=g).tolist() for _ in range(rows)]
    batch = pack([prompt] * rows, completions, 0, "cpu")  # one group: the prompt runs once, as in GRPO
    with SavedTally(model) as tally, torch.autocast("cpu", dtype=torch.bfloat16):
        logp, _ = completion_logprobs(model, batch, 0.7, with_entropy=True)
        ref = logp.detach() if args.beta else None
        loss, _ = grpo_loss(logp, None, ref, torch.ones(rows), batch.completion_mask, beta=args.beta)
    loss.backward()
    return sum(tally.bytes.values())


def ledger(args: MemoryArgs) -> dict[str, float]:
    """GB per line of the ledger, the phases and the peak."""
    one, two = saved_bytes(args, 1), saved_bytes(args, 2)
    model = shape_model(args.model, 1)
    cfg = model.config
    layers, per_layer = shape_config(args.model).num_hidden_layers, two - one
    activations = one - per_layer + layers * per_layer
    params_per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    outside = sum(p.numel() for p in model.parameters()) - params_per_layer  # embedding (tied head), norm
    params = outside + layers * params_per_layer
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    lora = args.finetune == "lora"
    if lora:  # the adapters of one layer, counted on the 1-layer model
        from models.lora import add_lora

        adapters = layers * sum(p.numel() for p in add_lora(model, args.lora_r, 2 * args.lora_r, 0.0).parameters()
                                if p.requires_grad)
    trained = adapters if lora else params
    rows = args.prompts_per_step * args.num_generations
    slots = args.prompt_tokens + args.completion_tokens
    out = {
        "weights": params * (2 if lora else 4) / GB,  # a LoRA base in bf16; full fine-tuning's fp32 master
        "gradients": trained * 4 / GB,
        "adamw_moments": 2 * trained * 4 / GB,
        "reference": params * 2 / GB if (args.beta and not lora) else 0.0,
        "decode_weights": params * 2 / GB,  # the bf16 (fused) copies the decode step reads
        "kv_cache": rows * slots * layers * cfg.num_key_value_heads * head_dim * 2 * 2 / GB,
        "decode_logits": rows * cfg.vocab_size * 4 * 3 / GB,  # fp32 logits, the softmax weights, a sort
        "saved_activations": activations / GB,
        "saved_per_layer": per_layer / GB,
    }
    out["held_all_step"] = out["weights"] + out["gradients"] + out["adamw_moments"] + out["reference"]
    out["rollout"] = out["decode_weights"] + out["kv_cache"] + out["decode_logits"]
    graphs = out["decode_weights"] + out["kv_cache"] if args.cuda_graphs else 0.0
    out["training"] = out["saved_activations"] + graphs
    out["peak"] = out["held_all_step"] + max(out["rollout"], out["training"])
    return out


def main(argv: list[str] | None = None) -> None:
    from common.flags import parse_flags

    args, _ = parse_flags(MemoryArgs, argv, __doc__, prog="python -m benchmarks.memory")
    figures = {k: round(v, 3) for k, v in ledger(args).items()}
    print(f"{args.model}, {args.finetune} fine-tuning, {args.prompts_per_step} x {args.num_generations} rows of "
          f"{args.prompt_tokens} + {args.completion_tokens} tokens, micro-batch {args.micro_batch_size}"
          f"{', CUDA graphs' if args.cuda_graphs else ''}{', checkpointing' if args.gradient_checkpointing else ''}:")
    for key, value in figures.items():
        print(f"  {key:18s} {value:8.3f} GB")
    print("JSON " + json.dumps({"benchmark": "memory", "model": args.model, "finetune": args.finetune,
                                "cuda_graphs": args.cuda_graphs, **figures}))


if __name__ == "__main__":
    from common.errors import run_cli

    run_cli(main)
