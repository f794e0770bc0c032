"""The SFT loop: LoRA on the completion tokens of (prompt, solution) pairs, plain PyTorch.

    for each optimizer step:
        for each micro-batch of the step:   loss = CE(target tokens) / target tokens in the step; backward
        clip grad norm to 1.0; AdamW step; LR warmup + decay; log one JSONL line
        every --eval_every steps and at the end: held-out format rate and accuracy
        every --save_every steps: checkpoint (adapter, optimizer, scheduler, RNG, step), atomically
    save the LoRA adapter and the merged model + tokenizer (from_pretrained(<sft_output>) loads it)

Under torchrun (common/distributed.py) each optimizer step takes grad_accum x world_size micro-batches
of one global seeded order, each rank its share; the loss is normalized by the step's target tokens
over all ranks, so DDP's averaged gradient is the single-process one. Rank 0 logs and saves.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.distributed import check_4bit, current, no_sync_unless, wrap_ddp
from common.runs import (
    RUN_CONFIG,
    JsonlLog,
    atomic_dir,
    atomic_files_into,
    load_checkpoint,
    now_iso,
    prepare_output_dir,
    rng_state,
    save_checkpoint,
    seed_everything,
    write_json,
)

LOG_NAME = "sft_training_logs.jsonl"


@dataclass
class SFTConfig:
    model_name: str = "Qwen/Qwen3-0.6B"
    sft_output: str = "./qwen_gsm8k_sft"
    dataset: str = "gsm8k"
    data_dir: str | None = None
    max_samples: int | None = None
    num_epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 2e-4
    lr_decay: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    full_finetune: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    max_length: int = 512
    keep_calculator: bool = False
    use_4bit: bool = False
    gradient_checkpointing: bool = False
    seed: int = 42
    eval_every: int = 0
    eval_samples: int = 100
    eval_max_new_tokens: int = 256
    eval_batch_size: int = 32
    save_every: int = 100
    resume: bool = False
    overwrite: bool = False
    device: str | None = None
    show_progress: bool = True


def _batches_of_epoch(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's shuffled example indices cut into batches: a pure function of (seed, epoch)."""
    import torch

    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return [order[i: i + batch_size] for i in range(0, n, batch_size)]


def train_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Run SFT as configured; returns the final eval summary."""
    import torch
    from tqdm.auto import tqdm

    from common.errors import fail
    from common.schedule import make_scheduler
    from data import load_records
    from eval.evaluate import eval_fields, evaluate, write_results
    from models import autocast, default_device, default_dtype, load_model_and_tokenizer
    from models.lora import add_lora, merged_copy_for_saving
    from sft.batching import collate, completion_loss_sum, encode_records

    dist = current()
    out = Path(cfg.sft_output)

    def prepare() -> None:
        prepare_output_dir(out, resume=cfg.resume, overwrite=cfg.overwrite, flag="--sft_output")
        if not cfg.resume:
            write_json(out / RUN_CONFIG, {"stage": "sft", **asdict(cfg), "world_size": dist.world_size})

    device = cfg.device or default_device()
    check_4bit(cfg.use_4bit, dist, device)
    dist.on_main(prepare)
    seed_everything(cfg.seed)

    train_records = load_records(cfg.dataset, "train", cfg.data_dir, cfg.max_samples, seed=cfg.seed)
    eval_records = load_records(cfg.dataset, "test", cfg.data_dir, cfg.eval_samples, seed=cfg.seed)
    if not train_records:
        fail("no training examples: check --dataset/--data_dir/--max_samples")
    model, tokenizer = load_model_and_tokenizer(cfg.model_name, device=device, load_in_4bit=cfg.use_4bit)
    if cfg.full_finetune:
        if cfg.use_4bit:
            fail("--use_4bit trains LoRA adapters on a frozen 4-bit base; drop --full_finetune or --use_4bit")
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.gradient_checkpointing)
    examples = encode_records(tokenizer, train_records, cfg.max_length, strip_calculator=not cfg.keep_calculator)
    train_model = wrap_ddp(model, dist, device)
    if dist.rank > 0:
        seed_everything(cfg.seed + dist.rank)  # its own dropout masks

    W = dist.world_size
    micro_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    if micro_per_epoch < W:
        fail(f"{len(examples)} examples make {micro_per_epoch} batch(es) of {cfg.batch_size}, fewer than the "
             f"{W} processes; lower --batch_size or use fewer processes")
    steps_per_epoch = max(1, micro_per_epoch // (cfg.grad_accum * W))
    total_steps = steps_per_epoch * cfg.num_epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, total_steps, int(cfg.warmup_ratio * total_steps), cfg.lr_decay)

    step = 0
    if cfg.resume:
        step = load_checkpoint(out, model, optimizer, scheduler, not cfg.full_finetune, device,
                               dist.rank, dist.world_size)
        if dist.is_main:
            print(f"resuming {out} at step {step}/{total_steps}")
    log = JsonlLog(out / LOG_NAME, resume_step=step if cfg.resume else None) if dist.is_main else None

    def run_eval() -> dict[str, Any]:
        summary, predictions = evaluate(model, tokenizer, eval_records, batch_size=cfg.eval_batch_size,
                                        max_new_tokens=cfg.eval_max_new_tokens, show_progress=cfg.show_progress)
        if dist.is_main:
            write_results(out / "eval", summary, predictions)
        return summary

    if step == 0 and cfg.eval_every > 0:
        before = run_eval()
        if log:
            log.write({"timestamp_iso": now_iso(), "step": 0, "epoch": 0.0, **eval_fields(before)})
        if dist.is_main:
            print(f"before SFT: accuracy {before['accuracy']:.3f}, format rate {before['format_rate']:.3f}")

    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="sft", unit="step",
               disable=not (cfg.show_progress and dist.is_main))
    summary: dict[str, Any] = {}
    while step < total_steps:
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        batches = _batches_of_epoch(len(examples), cfg.batch_size, cfg.seed, epoch)
        per_step = cfg.grad_accum * W
        micro = batches[step_in_epoch * per_step: (step_in_epoch + 1) * per_step][dist.rank::W]  # this rank's
        t0 = time.perf_counter()
        collated = [collate([examples[i] for i in idx], tokenizer.pad_token_id) for idx in micro]
        counts = torch.tensor([sum(int((b["labels"][:, 1:] != -100).sum()) for b in collated),
                               sum(int(b["attention_mask"].sum()) for b in collated)], device=device)
        target_tokens, tokens = dist.all_reduce(counts).tolist()  # over all ranks
        loss_total = 0.0
        for k, b in enumerate(collated):
            b = {name: v.to(device) for name, v in b.items()}
            with no_sync_unless(train_model, sync=k == len(collated) - 1):
                with autocast(device):
                    loss = completion_loss_sum(train_model, b) / max(1, target_tokens)
                (loss * W).backward()  # DDP averages over ranks; the sum over ranks is the step's loss
            loss_total += loss.item()
        loss_total = dist.all_reduce(torch.tensor(loss_total, dtype=torch.float64, device=device)).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = dist.all_reduce(torch.tensor(time.perf_counter() - t0, dtype=torch.float64, device=device), "max").item()
        step += 1
        record = {"timestamp_iso": now_iso(), "step": step, "epoch": round(step / steps_per_epoch, 4),
                  "loss": loss_total, "learning_rate": lr, "grad_norm": grad_norm, "tokens": tokens,
                  "target_tokens": target_tokens, "tokens_per_s": tokens / dt, "time_per_step_s": dt}
        if step == total_steps or (cfg.eval_every > 0 and step % cfg.eval_every == 0):
            summary = run_eval()
            record.update(eval_fields(summary))
            model.train()
        if log:
            log.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_total:.3f}", tok_s=f"{tokens / dt:.0f}")
        if step % cfg.save_every == 0 or step == total_steps:
            rng_states = dist.gather_objects(rng_state())
            if dist.is_main:
                save_checkpoint(out, model, optimizer, scheduler, step, total_steps, not cfg.full_finetune,
                                rng_states)
    bar.close()
    if log:
        log.close()

    if not summary:  # resumed at the end: nothing trained, still report
        summary = run_eval()
    if not dist.is_main:
        dist.barrier()  # wait for rank 0's saved model, so the job ends when the run is complete
        return summary
    if not cfg.full_finetune:
        atomic_dir(out / "adapter", model.save_pretrained)

    def write_merged(tmp: Path) -> None:
        merged = model if cfg.full_finetune else merged_copy_for_saving(
            model, cfg.model_name, str(out / "adapter"), default_dtype(device))
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_files_into(out, write_merged)
    print(f"after SFT: accuracy {summary['accuracy']:.3f}, format rate {summary['format_rate']:.3f}, "
          f"truncation rate {summary['truncation_rate']:.3f} on {len(eval_records)} held-out problems")
    print(f"saved: model + tokenizer in {out}" + ("" if cfg.full_finetune else f", LoRA adapter in {out / 'adapter'}"))
    dist.barrier()
    return summary

