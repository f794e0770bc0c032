"""The GRPO step's GPU memory ledger, and the check that a run will fit before its model loads.

`ledger(settings)`: GB per line, from the model's shapes under CUDA's dtype policy (fp32 master weights,
gradients and AdamW moments for what trains; a bf16 frozen reference at beta > 0 without LoRA; a bf16
base under LoRA, an NF4 one with 4-bit) and what autograd saves over one training micro-batch, tallied
by a saved-tensor hook over a real forward and backward of the step's own loss under bf16 autocast, on 1
and 2 layers of the shape, scaled to its depth. The peak is what is held all step plus the larger of the
rollout and the training micro-batch; it leaves out the CUDA context and the allocator's fragmentation.

`check_fit(cfg, ...)`: on CUDA, before loading, the run's own ledger against the device's free memory;
when it would not fit, one line naming the settings that would, with their peaks.
`python -m benchmarks.memory` prints the ledger for any settings.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch

from common.errors import fail
from grpo.batch import completion_logprobs, pack
from grpo.loss import LossBatch, LossSettings, grpo_loss
from models.loading import model_config, shape_model
from models.lora import add_lora
from models.memory import SavedTally

GB = 2**30
# the share of the free memory a ledger's peak may take: the ledger leaves out the allocator's
# fragmentation (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, the recipe's, keeps it small)
FIT_SHARE = 0.95
# bitsandbytes NF4 with double quantization: 4 bits a weight, an 8-bit absmax per 64 weights and an fp32
# constant per 256 absmaxes (bytes per weight)
NF4_BYTES = 0.5 + (1 + 4 / 256) / 64


@dataclass(frozen=True)
class LedgerSettings:
    """What the ledger depends on: a model (any name load_model takes) and the step's shape."""

    model: str = "random:Qwen/Qwen3-0.6B"
    finetune: str = "full"
    use_4bit: bool = False
    prompts_per_step: int = 4
    num_generations: int = 4
    micro_batch_size: int = 4
    prompt_tokens: int = 150
    completion_tokens: int = 512
    beta: float = 0.01
    lora_r: int = 16
    cuda_graphs: bool = False
    gradient_checkpointing: bool = False


def saved_bytes(s: Any, layers: int, device: str = "cpu") -> int:
    """Bytes autograd saves over one training micro-batch's forward (the projected loss included), on a
    `layers`-layer model of the shape `s.model`, computed on `device`."""
    with torch.device(device):  # built where it runs: a GPU initializes a 0.6 GB embedding in milliseconds
        model = shape_model(s.model, layers)
    # a 4-bit base saves what a bf16 one saves (the inputs of its products): tallied as plain LoRA
    if s.finetune == "lora":
        model = add_lora(model, s.lora_r, 2 * s.lora_r, 0.0, s.gradient_checkpointing)
    elif s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    rows, vocab = s.micro_batch_size, model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (s.prompt_tokens,), generator=g).tolist()
    completions = [torch.randint(3, vocab, (s.completion_tokens,), generator=g).tolist() for _ in range(rows)]
    batch = pack([prompt] * rows, completions, 0, device)  # one group: the prompt runs once, as in GRPO
    with SavedTally(model) as tally, torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        logp, _ = completion_logprobs(model, batch, 0.7, with_entropy=True)
        ref = logp.detach() if s.beta else None
        inputs = LossBatch(torch.ones(rows, device=device), batch.completion_mask, ref_logprobs=ref)
        loss, _ = grpo_loss(logp, inputs, LossSettings(beta=s.beta))
    loss.backward()
    return sum(tally.bytes.values())


def ledger(s: Any, device: str = "cpu") -> dict[str, float]:
    """GB per line of the ledger, the phases and the peak, for settings `s` (a LedgerSettings or any
    object with its fields); the activations are tallied on `device` (fast on a GPU)."""
    settings = LedgerSettings(**{f.name: getattr(s, f.name) for f in dataclasses.fields(LedgerSettings)})
    return dict(_ledger(settings, device))


@functools.lru_cache(maxsize=64)  # the fit check asks again for what it has asked
def _ledger(s: LedgerSettings, device: str) -> dict[str, float]:
    one, two = saved_bytes(s, 1, device), saved_bytes(s, 2, device)
    with torch.device("meta"):  # only its parameters' counts are read
        model = shape_model(s.model, 1)
    cfg = model.config
    layers, per_layer = model_config(s.model).num_hidden_layers, two - one
    activations = one - per_layer + layers * per_layer
    layer = model.model.layers[0]
    params_per_layer = sum(p.numel() for p in layer.parameters())
    linear_per_layer = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    outside = sum(p.numel() for p in model.parameters()) - params_per_layer  # embedding (tied head), norm
    params = outside + layers * params_per_layer
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    lora, nf4 = s.finetune == "lora", s.finetune == "lora" and s.use_4bit
    if lora:  # the adapters of one layer, counted on the 1-layer model
        adapters = layers * sum(p.numel() for p in add_lora(model, s.lora_r, 2 * s.lora_r, 0.0).parameters()
                                if p.requires_grad)
    trained = adapters if lora else params
    rows = s.prompts_per_step * s.num_generations
    slots = s.prompt_tokens + s.completion_tokens
    if nf4:  # the layers' linear weights in NF4; the embedding (tied head) and norms stay bf16
        weights = layers * linear_per_layer * NF4_BYTES + (params - layers * linear_per_layer) * 2
    else:  # a LoRA base in bf16; full fine-tuning's fp32 master
        weights = params * (2 if lora else 4)
    out = {
        "weights": weights / GB,
        "gradients": trained * 4 / GB,
        "adamw_moments": 2 * trained * 4 / GB,
        "reference": params * 2 / GB if (s.beta and not lora) else 0.0,
        # the bf16 (fused) copies the lean decode step reads; a 4-bit model decodes through its own forward
        "decode_weights": 0.0 if nf4 else params * 2 / GB,
        "kv_cache": rows * slots * layers * cfg.num_key_value_heads * head_dim * 2 * 2 / GB,
        "decode_logits": rows * cfg.vocab_size * 4 * 3 / GB,  # fp32 logits, the softmax weights, a sort
        "saved_activations": activations / GB,
        "saved_per_layer": per_layer / GB,
    }
    out["held_all_step"] = out["weights"] + out["gradients"] + out["adamw_moments"] + out["reference"]
    out["rollout"] = out["decode_weights"] + out["kv_cache"] + out["decode_logits"]
    graphs = out["decode_weights"] + out["kv_cache"] if (s.cuda_graphs and not nf4) else 0.0
    out["training"] = out["saved_activations"] + graphs
    out["peak"] = out["held_all_step"] + max(out["rollout"], out["training"])
    return out


def alternatives(s: LedgerSettings) -> list[tuple[str, LedgerSettings]]:
    """The settings a user can turn to when `s` does not fit, as flags, in the order they cost least:
    checkpointing, LoRA, a 4-bit base, smaller micro-batches."""
    out = []
    if not s.gradient_checkpointing:
        out.append(("--gradient_checkpointing", dataclasses.replace(s, gradient_checkpointing=True)))
    if s.finetune != "lora":
        out.append(("--finetune lora", dataclasses.replace(s, finetune="lora")))
        out.append(("--finetune lora --gradient_checkpointing",
                    dataclasses.replace(s, finetune="lora", gradient_checkpointing=True)))
    if not s.use_4bit:
        out.append(("--finetune lora --use_4bit", dataclasses.replace(s, finetune="lora", use_4bit=True)))
        out.append(("--finetune lora --use_4bit --gradient_checkpointing",
                    dataclasses.replace(s, finetune="lora", use_4bit=True, gradient_checkpointing=True)))
    micro = s.micro_batch_size // 2
    while micro >= 1:
        out.append((f"--micro_batch_size {micro}", dataclasses.replace(s, micro_batch_size=micro)))
        micro //= 2
    return out


def _gb(x: float) -> str:
    return f"{x:.1f} GB" if x >= 1 else f"{x:.2g} GB"


def free_bytes(device: str) -> int:
    """Free memory of a CUDA device, as the driver reports it (other processes' use excluded)."""
    return torch.cuda.mem_get_info(torch.device(device))[0]


def check_fit(s: LedgerSettings, device: str, free: int | None = None) -> float:
    """The ledger's peak (GB) for `s`; fails in one line when it is above FIT_SHARE of the free memory
    (`free` bytes, else the device's), naming the alternatives that would fit, with their peaks."""
    free = free_bytes(device) if free is None else free
    room = FIT_SHARE * free / GB
    peak = ledger(s, device)["peak"]
    if peak <= room:
        return peak
    options = [(flags, ledger(alt, device)["peak"]) for flags, alt in alternatives(s)]
    fitting = [f"{flags} ({_gb(p)})" for flags, p in options if p <= room]
    if fitting:
        advice = "settings that fit: " + ", ".join(fitting)
    else:
        flags, p = min(options, key=lambda x: x[1]) if options else ("(none)", peak)
        advice = f"nothing tried fits; the smallest is {flags} at {_gb(p)}: a smaller model or a larger GPU"
    fail(f"this run needs about {_gb(peak)} at its peak (the memory ledger: python -m benchmarks.memory) but "
         f"{device} has {_gb(free / GB)} free ({FIT_SHARE:.0%} usable); {advice}; or --no_fit_check to try anyway")
