"""The SFT loop: LoRA on the completion tokens of (prompt, solution) pairs, plain PyTorch.

    for each optimizer step:
        for each micro-batch of the step:   loss = CE(target tokens) / target tokens in the step; backward
        clip grad norm to 1.0; AdamW step; LR warmup + decay; log one JSONL line
        every --eval_every steps and at the end: held-out format rate and accuracy
        every --save_every steps: checkpoint (adapter, optimizer, scheduler, RNG, step), atomically
    save the LoRA adapter and the merged model + tokenizer (from_pretrained(<sft_output>) loads it)

The settings are sft/config.py's (each a flag of train_sft.py). Under torchrun (common/distributed.py)
each optimizer step takes grad_accum x world_size micro-batches of one global seeded order, each rank
its share; the loss is normalized by the step's target tokens over all ranks, so DDP's averaged
gradient is the single-process one. Rank 0 logs and saves (training/run.py, shared with GRPO).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import torch

from common.distributed import Dist, check_4bit, current, no_sync_unless, wrap_ddp
from common.errors import fail
from common.flags import check
from common.run_files import now_iso, seed_everything
from common.schedule import adamw, make_scheduler
from data import require_solutions
from data.prompt import check_thinking, resolve_format, warn_thinking
from models import autocast, default_device, default_dtype, load_model_and_tokenizer, load_tokenizer
from models.lora import add_lora
from sampling import Sampler, SamplingParams
from sft.batching import collate, completion_loss_sum, encode_records
from sft.config import SFTConfig
from training.run import Run, check_lengths, check_watch, restores_signals, run_data

LOG_NAME = "sft_training_logs.jsonl"

__all__ = ["LOG_NAME", "SFTConfig", "train_sft"]


def _batches_of_epoch(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's shuffled example indices cut into batches: a pure function of (seed, epoch)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return [order[i: i + batch_size] for i in range(0, n, batch_size)]


def _model(cfg: SFTConfig, device: str) -> tuple[Any, Any]:
    """The model to train (LoRA adapters, or every weight with --finetune full) and its tokenizer."""
    # full fine-tuning keeps fp32 master weights (bf16 weights would round small AdamW updates away; the
    # forward still runs under bf16 autocast on CUDA); LoRA trains fp32 adapters on a bf16 base there
    dtype = torch.float32 if not cfg.lora else default_dtype(device)
    model, tokenizer = load_model_and_tokenizer(cfg.model_name, device=device, load_in_4bit=cfg.use_4bit, dtype=dtype)
    if cfg.lora:
        return add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.gradient_checkpointing), tokenizer
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def sft_step(train_model: Any, batches: list[dict[str, Any]], dist: Dist, device: str) -> tuple[float, int, int]:
    """Forward and backward over this rank's micro-batches of one optimizer step, the loss normalized by
    the step's target tokens over all ranks: (step loss, target tokens, tokens), all ranks."""
    counts = torch.tensor([sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches),
                           sum(int(b["attention_mask"].sum()) for b in batches)], device=device)
    target_tokens, tokens = dist.all_reduce(counts).tolist()
    loss_total = 0.0
    for k, b in enumerate(batches):
        b = {name: v.to(device) for name, v in b.items()}
        with no_sync_unless(train_model, sync=k == len(batches) - 1):
            with autocast(device):
                loss = completion_loss_sum(train_model, b) / max(1, target_tokens)
            (loss * dist.world_size).backward()  # DDP averages over ranks; the sum over ranks is the step's loss
        loss_total += loss.item()
    loss_total = dist.all_reduce(torch.tensor(loss_total, dtype=torch.float64, device=device)).item()
    return loss_total, target_tokens, tokens


def _checked(cfg: SFTConfig) -> tuple[Dist, str, str]:
    """Every check that needs no data or model, so a bad flag stops the run in one line before any load:
    (dist, device, the prompt format)."""
    check(cfg)
    check_watch(cfg)
    dist, device = current(), cfg.device or default_device()
    check_4bit(cfg.use_4bit, dist, device)
    fmt = resolve_format(cfg, cfg.model_name)
    check_thinking(fmt, cfg.model_name, load_tokenizer)
    warn_thinking(fmt, cfg.eval_max_new_tokens, True, "SFT's evals")
    return dist, device, fmt


def _examples(cfg: SFTConfig, tokenizer: Any, records: list[dict[str, Any]], fmt: str,
              dist: Dist) -> tuple[list[dict[str, Any]], int]:
    """The encoded training examples and how many were skipped as longer than --max_length."""
    examples, too_long = encode_records(tokenizer, records, cfg.max_length, not cfg.keep_calculator, fmt)
    check_lengths(len(examples), too_long, len(records), "example", "--max_length", cfg.max_length, dist,
                  "never cut mid-answer; logged as examples_skipped")
    return examples, too_long


def _schedule(cfg: SFTConfig, n_examples: int, world_size: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps): a step takes grad_accum micro-batches on each process."""
    micro_per_epoch = math.ceil(n_examples / cfg.batch_size)
    if micro_per_epoch < world_size:
        fail(f"{n_examples} examples make {micro_per_epoch} batch(es) of {cfg.batch_size}, fewer than the "
             f"{world_size} processes; lower --batch_size or use fewer processes")
    steps_per_epoch = max(1, micro_per_epoch // (cfg.grad_accum * world_size))
    return steps_per_epoch, min(steps_per_epoch * cfg.num_epochs, cfg.max_steps or math.inf)


def _micro_batches(cfg: SFTConfig, step: int, steps_per_epoch: int, n_examples: int, dist: Dist) -> list[list[int]]:
    """This rank's micro-batches (example indices) of optimizer step `step` (0-based)."""
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    per_step = cfg.grad_accum * dist.world_size
    batches = _batches_of_epoch(n_examples, cfg.batch_size, cfg.seed, epoch)
    return batches[step_in_epoch * per_step: (step_in_epoch + 1) * per_step][dist.rank::dist.world_size]


def _optimizer_step(cfg: SFTConfig, train_model: Any, params: list[torch.nn.Parameter], optimizer: Any,
                    scheduler: Any, dist: Dist, device: str, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One timed optimizer step: forward and backward over this rank's micro-`batches` (collated inside the
    timed span), clip, AdamW, LR schedule. Returns its log fields; the time is the slowest rank's."""
    t0 = time.perf_counter()
    loss, target_tokens, tokens = sft_step(train_model, list(batches), dist, device)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = dist.all_reduce(torch.tensor(time.perf_counter() - t0, dtype=torch.float64, device=device), "max").item()
    return {"loss": loss, "learning_rate": lr, "grad_norm": grad_norm, "tokens": tokens,
            "target_tokens": target_tokens, "tokens_per_s": tokens / dt, "time_per_step_s": dt}


@restores_signals
def train_sft(cfg: SFTConfig, train_records: list[dict[str, Any]] | None = None,
              eval_records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run SFT as configured; returns the final eval summary. The Python API: `train_records` /
    `eval_records` (dicts with the columns `cfg` names; training rows need worked solutions) replace
    `cfg.dataset`."""
    dist, device, fmt = _checked(cfg)
    # data
    seed_everything(cfg.seed)
    source = cfg.dataset if train_records is None else "train_records"
    train_records, eval_sets = run_data(cfg, train_records, eval_records)
    held_out = next(iter(eval_sets.values()))  # the main held-out set
    require_solutions(train_records, source, cfg.fields())
    # the output folder is prepared (an --overwrite'n run deleted) only once the data is known to be good
    run = Run(cfg, dist, out=cfg.sft_output, flag="--sft_output", stage="sft", log_name=LOG_NAME)
    # model, examples, optimizer
    model, tokenizer = _model(cfg, device)
    examples, too_long = _examples(cfg, tokenizer, train_records, fmt, dist)
    train_model = wrap_ddp(model, dist, device)
    if dist.rank > 0:
        seed_everything(cfg.seed + dist.rank)  # its own dropout masks
    steps_per_epoch, total_steps = _schedule(cfg, len(examples), dist.world_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, device, cfg.learning_rate, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, total_steps, int(cfg.warmup_ratio * total_steps), cfg.lr_decay)
    step = run.start(model, optimizer, scheduler, cfg.lora, device, total_steps)

    def evaluate(at: int | None = None) -> tuple[dict[str, Any], dict[str, float]]:
        sampler = Sampler.for_tokenizer(model, tokenizer, batch_size=cfg.eval_batch_size, continuous=True)
        return run.evaluate_sets(sampler, tokenizer, eval_sets, SamplingParams(max_new_tokens=cfg.eval_max_new_tokens),
                                 step=at, prompt_format=fmt)

    if step == 0 and cfg.eval_every > 0:
        before, fields = evaluate(0)
        run.write({"timestamp_iso": now_iso(), "step": 0, "epoch": 0.0, **fields})
        if dist.is_main:
            print(f"before SFT: accuracy {before['accuracy']:.3f}, format rate {before['format_rate']:.3f}")
    # the loop: a forward/backward/step, its log line, evals, checkpoints
    model.train()
    how = dict(lora=cfg.lora, base_model=cfg.model_name, dtype=default_dtype(device), prompt_format=fmt)
    bar = run.progress("sft", total_steps, step)
    summary: dict[str, Any] = {}
    while step < total_steps:
        micro = _micro_batches(cfg, step, steps_per_epoch, len(examples), dist)
        fields = _optimizer_step(cfg, train_model, params, optimizer, scheduler, dist, device,
                                 (collate([examples[i] for i in idx], tokenizer.pad_token_id) for idx in micro))
        step += 1
        record = {"timestamp_iso": now_iso(), "step": step, "epoch": round(step / steps_per_epoch, 4), **fields,
                  "examples_skipped": too_long}
        if step == total_steps or (cfg.eval_every > 0 and step % cfg.eval_every == 0):
            summary, fields = evaluate(step)
            record.update(fields)
        run.write(record)
        bar.update(step, loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                   **({"eval_accuracy": f"{record['eval_accuracy']:.3f}"} if "eval_accuracy" in record else {}))
        run.keep(step, total_steps, record, model, tokenizer, **how)
        run.checkpoint(step, total_steps, model, optimizer, scheduler, cfg.lora)
    bar.close()
    # the final eval and save
    summary = summary or evaluate()[0]  # resumed at the end: nothing trained, still report
    run.save_final(model, tokenizer, **how, message=(
                       f"after SFT: accuracy {summary['accuracy']:.3f}, format rate {summary['format_rate']:.3f}, "
                       f"truncation rate {summary['truncation_rate']:.3f} on {len(held_out)} held-out problems\n"
                       f"saved: model + tokenizer in {run.out}"
                       + ("" if not cfg.lora else f", LoRA adapter in {run.out / 'adapter'}")))
    return summary
