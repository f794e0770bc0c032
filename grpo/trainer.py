"""The GRPO loop, in plain PyTorch.

    for step in 1..max_steps:
        prompts <- next `prompts_per_step` questions
        rollout: G = num_generations completions per prompt (temperature, top_p, stop at end-of-turn)
        rewards r <- numeric_reward(completions, answers); advantages A <- group_advantages(r, G)
        old logprobs (only when num_iterations > 1) and reference logprobs (only when beta > 0), no grad
        repeat num_iterations times:
            for each micro-batch: loss <- grpo_loss(logp, old, ref, A, mask); backward (accumulate)
            clip grad norm (logged before clipping); AdamW step; LR schedule
        log one JSONL line; eval every --eval_every; checkpoint every --save_every (atomic)
    save the final model (LoRA merged) + tokenizer in HF format

Under torchrun (common/distributed.py) each of the W ranks takes prompts_per_step / W of the step's
prompts, so a group never spans ranks; rewards are gathered so advantages and metrics are the batch's;
DDP averages the gradients, and the loss is scaled so the update equals the single-process one on the
same completions. Rank 0 alone writes the log, checkpoints and the final model.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from common.distributed import Dist, check_4bit, current, no_sync_unless, wrap_ddp
from common.errors import UserError, fail
from common.runs import (
    CHECKPOINT,
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
from grpo.batch import RolloutBatch, completion_logits, pack
from grpo.loss import LOSS_TYPES, SCALES, group_advantages, grpo_loss, token_logprobs, token_logprobs_and_entropy
from sampling.cuda_graphs import DecodeGraphs, check_cuda_graphs

LOG_NAME = "grpo_training_logs.jsonl"
WARN_AFTER = 10  # steps of a bad signal before the one warning
MAX_NONFINITE = 3  # non-finite steps in a row before the run stops


@dataclass
class GRPOConfig:
    model_name: str | None = None  # None: start from sft_output
    sft_output: str = "./qwen_gsm8k_sft"
    grpo_output: str = "./qwen_gsm8k_grpo"
    dataset: str = "gsm8k"
    data_dir: str | None = None
    max_samples: int | None = None
    max_steps: int | None = None
    num_epochs: float = 1.0
    prompts_per_step: int = 4
    num_generations: int = 4
    micro_batch_size: int = 4
    max_completion_length: int = 512
    temperature: float = 0.7
    top_p: float = 1.0
    cuda_graphs: bool = False
    learning_rate: float = 1e-6
    lr_decay: str = "constant"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    adam_beta2: float = 0.999
    beta: float = 0.01
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    num_iterations: int = 1
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    use_4bit: bool = False
    gradient_checkpointing: bool = False
    seed: int = 42
    save_every: int = 50
    eval_every: int = 0
    eval_samples: int = 100
    eval_max_new_tokens: int | None = None  # None: max_completion_length
    eval_batch_size: int = 32
    resume: bool = False
    overwrite: bool = False
    device: str | None = None
    show_progress: bool = True


def _validate(cfg: GRPOConfig, dist: Dist, device: str) -> None:
    if cfg.loss_type not in LOSS_TYPES:
        fail(f"--loss_type must be one of {', '.join(LOSS_TYPES)}")
    if cfg.scale_rewards not in SCALES:
        fail(f"--scale_rewards must be one of {', '.join(SCALES)}")
    if cfg.num_generations < 2:
        fail("--num_generations must be at least 2: advantages compare samples of the same prompt")
    if cfg.use_4bit and not cfg.lora:
        fail("--use_4bit trains LoRA adapters on a frozen 4-bit base; add --lora")
    if cfg.temperature <= 0:
        fail("--temperature must be > 0: GRPO needs different samples per prompt")
    if cfg.prompts_per_step % dist.world_size:
        fail(f"--prompts_per_step {cfg.prompts_per_step} does not split across {dist.world_size} processes; "
             f"use a multiple of {dist.world_size} (a group of samples never spans processes)")
    check_4bit(cfg.use_4bit, dist, device)
    check_cuda_graphs(cfg.cuda_graphs, device)


def _start_model(cfg: GRPOConfig) -> str:
    if cfg.model_name:
        return cfg.model_name
    if not (Path(cfg.sft_output) / "config.json").is_file():
        fail(f"no SFT model in {cfg.sft_output}: run train_sft.py first, or pass --model_name (e.g. tiny)")
    return cfg.sft_output


class _Timer:
    """Wall-clock phases of a step; synchronizes CUDA before each reading so the split is honest."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.totals: dict[str, float] = {}

    def __call__(self, phase: str):
        timer = self

        class _Phase:
            def __enter__(self):
                if timer.cuda:
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                if timer.cuda:
                    torch.cuda.synchronize()
                timer.totals[phase] = timer.totals.get(phase, 0.0) + time.perf_counter() - self.t0

        return _Phase()


def _peak_memory_gb(device: str) -> tuple[float, float]:
    """(peak allocated, peak reserved by the caching allocator) on CUDA; the peak RSS twice on the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    return rss, rss


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def _prompt_indices(step: int, n: int, per_step: int, seed: int, rank: int = 0,
                    world_size: int = 1) -> tuple[list[int], float]:
    """This rank's dataset indices of step `step` (0-based) and the epoch the step reaches: one seeded
    global order per epoch, each step's prompts cut into world_size contiguous shards."""
    start = step * per_step
    indices = [_epoch_order(n, seed, (start + k) // n)[(start + k) % n] for k in range(per_step)]
    share = per_step // world_size
    return indices[rank * share: (rank + 1) * share], (start + per_step) / n


@torch.no_grad()
def _logprobs_no_grad(model, batch: RolloutBatch, micro: int, temperature: float, autocast) -> torch.Tensor:
    out = []
    for s in range(0, batch.input_ids.shape[0], micro):
        rows = batch.rows(slice(s, s + micro))
        with autocast():
            logp = token_logprobs(completion_logits(model, rows), rows.completion_ids, temperature)
        out.append(torch.nn.functional.pad(logp, (0, batch.completion_width - rows.completion_width)))
    return torch.cat(out)


def reference_logprobs(model, ref_model, batch: RolloutBatch, micro: int, temperature: float,
                       autocast) -> torch.Tensor:
    """Logprobs under the frozen reference: `ref_model`, or with LoRA (ref_model None) the same model
    with its adapter switched off, so no second copy of the weights is held."""
    if ref_model is None:
        with model.disable_adapter():
            return _logprobs_no_grad(model, batch, micro, temperature, autocast)
    return _logprobs_no_grad(ref_model, batch, micro, temperature, autocast)


def micro_batch_backward(train_model, mb: RolloutBatch, old_logprobs: torch.Tensor | None,
                         ref_logprobs: torch.Tensor | None, advantages: torch.Tensor, cfg: GRPOConfig,
                         num_items: float, scale: float, sync: bool, autocast) -> tuple[dict[str, float], float]:
    """Loss of one micro-batch and its backward (gradients accumulate; DDP all-reduces only when `sync`);
    returns (grpo_loss's metrics, the summed entropy of its completion tokens). The [rows, C, V] logits
    are never bound to a name: they are freed once the log-prob pass's backward has used them, not held
    through the model's whole backward (on Qwen3-0.6B at 4 x 512 tokens, 0.6 GB in bf16)."""
    with no_sync_unless(train_model, sync=sync):
        with autocast():
            logp, entropy = token_logprobs_and_entropy(completion_logits(train_model, mb), mb.completion_ids,
                                                       cfg.temperature)
        loss, metrics = grpo_loss(logp, old_logprobs, ref_logprobs, advantages, mb.completion_mask, beta=cfg.beta,
                                  epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type,
                                  max_completion_length=cfg.max_completion_length, num_items_in_batch=num_items)
        (loss * scale).backward()
    return metrics, (entropy * mb.completion_mask).sum().item()


def train_grpo(cfg: GRPOConfig, rollout_hook: Any = None) -> dict[str, Any]:
    """Run GRPO as configured; returns the last log record.

    `rollout_hook(step, prompts, answers) -> list[list[int]] | None` may supply fixed completions
    (token ids) instead of sampling: tests and the DDP equivalence check use it.
    """
    from tqdm.auto import tqdm

    from common.schedule import make_scheduler
    from data import load_records
    from data.prompt import encode_prompt
    from eval.evaluate import eval_fields, evaluate, write_results
    from models import autocast as autocast_for
    from models import default_device, frozen_copy, load_model_and_tokenizer
    from models.lora import add_lora, merged_copy_for_saving
    from rewards import numeric_reward
    from sampling import sample

    dist = current()
    device = cfg.device or default_device()
    _validate(cfg, dist, device)
    start_model = _start_model(cfg)
    out = Path(cfg.grpo_output)
    train_records = load_records(cfg.dataset, "train", cfg.data_dir, cfg.max_samples, seed=cfg.seed)
    eval_records = load_records(cfg.dataset, "test", cfg.data_dir, cfg.eval_samples, seed=cfg.seed)
    if not train_records:
        fail("no training prompts: check --dataset/--data_dir/--max_samples")

    def prepare() -> None:
        prepare_output_dir(out, resume=cfg.resume, overwrite=cfg.overwrite, flag="--grpo_output")
        if not cfg.resume:
            write_json(out / RUN_CONFIG, {"stage": "grpo", "start_model": start_model, **asdict(cfg),
                                          "world_size": dist.world_size})

    dist.on_main(prepare)
    seed_everything(cfg.seed)

    # Full fine-tuning keeps fp32 master weights (bf16 weights drop lr-1e-6 updates); compute is bf16 autocast.
    cuda = device.startswith("cuda")
    weight_dtype = torch.bfloat16 if (cuda and cfg.lora) else torch.float32
    model, tokenizer = load_model_and_tokenizer(start_model, device=device, dtype=weight_dtype,
                                                load_in_4bit=cfg.use_4bit)
    ref_model = None
    if cfg.lora:
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, 0.0, cfg.gradient_checkpointing)
    else:
        if cfg.beta != 0.0:
            ref_model = frozen_copy(model, torch.bfloat16 if cuda else torch.float32)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    train_model = wrap_ddp(model, dist, device)  # backward passes go through DDP; sampling uses `model`
    if dist.rank > 0:
        seed_everything(cfg.seed + dist.rank)  # each rank samples its own completions

    def autocast():
        return autocast_for(device)

    steps_per_epoch = max(1, len(train_records) // cfg.prompts_per_step)
    total_steps = cfg.max_steps if cfg.max_steps is not None else max(1, int(cfg.num_epochs * steps_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  betas=(0.9, cfg.adam_beta2))
    updates = total_steps * cfg.num_iterations
    scheduler = make_scheduler(optimizer, updates, int(cfg.warmup_ratio * updates), cfg.lr_decay)

    step = 0
    if cfg.resume:
        step = load_checkpoint(out, model, optimizer, scheduler, cfg.lora, device, dist.rank, dist.world_size)
        if dist.is_main:
            print(f"resuming {out} at step {step}/{total_steps}")
    log = JsonlLog(out / LOG_NAME, resume_step=step if cfg.resume else None) if dist.is_main else None

    G = cfg.num_generations
    graphs = DecodeGraphs() if cfg.cuda_graphs else False  # captured once, replayed by every step's rollout
    eval_tokens = cfg.eval_max_new_tokens or cfg.max_completion_length

    def run_eval() -> dict[str, float]:
        with autocast():
            summary, predictions = evaluate(model, tokenizer, eval_records, batch_size=cfg.eval_batch_size,
                                            max_new_tokens=eval_tokens, show_progress=cfg.show_progress,
                                            cuda_graphs=cfg.cuda_graphs)
        if dist.is_main:
            write_results(out / "eval", summary, predictions)
        model.train()
        return eval_fields(summary)

    if step == 0 and cfg.eval_every > 0:  # the starting point, so the curve has its baseline
        fields = run_eval()
        if log:
            log.write({"timestamp_iso": now_iso(), "step": 0, "epoch": 0.0, "device": device, "seed": cfg.seed,
                       "world_size": dist.world_size, **fields})
    bad_signal_steps, warned, nonfinite_in_row = 0, False, 0
    record: dict[str, Any] = {}
    bar = tqdm(total=total_steps, initial=step, desc="grpo", unit="step",
               disable=not (cfg.show_progress and dist.is_main))
    while step < total_steps:
        timer = _Timer(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        step_start = time.perf_counter()
        indices, epoch = _prompt_indices(step, len(train_records), cfg.prompts_per_step, cfg.seed,
                                         dist.rank, dist.world_size)
        records = [train_records[i] for i in indices]
        prompts = [encode_prompt(tokenizer, r["question"]) for r in records]

        # 1. rollout: G samples per prompt
        with timer("generation"):
            fixed = rollout_hook(step, prompts, [r["answer"] for r in records]) if rollout_hook else None
            if fixed is None:
                with autocast():
                    rollout = sample(model, prompts, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id, num_samples=G,
                                     max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                                     top_p=cfg.top_p, cuda_graphs=graphs)
                completions, truncated = rollout.token_ids, rollout.truncated
            else:
                completions = fixed
                truncated = [tokenizer.eos_token_id not in c for c in completions]
        model.train()

        # 2. rewards and group-relative advantages (over the whole step's batch: all ranks' rewards)
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        answers = [r["answer"] for r in records for _ in range(G)]
        local_rewards = torch.tensor(numeric_reward(texts, answers), dtype=torch.float32, device=device)
        rewards = dist.all_gather(local_rewards).cpu()  # [W * B]: rank 0's rows first
        all_advantages = group_advantages(rewards, G, cfg.scale_rewards)
        B = len(completions)
        advantages = all_advantages[dist.rank * B: (dist.rank + 1) * B].to(device)
        batch = pack([p for p in prompts for _ in range(G)], completions, tokenizer.pad_token_id, device)
        # completion tokens of the whole step, all ranks: the dapo normalizer
        num_items = dist.all_reduce(batch.completion_mask.sum().float()).clamp(min=1).item()

        # 3. old (only when the rollout is reused) and reference logprobs, no grad
        with timer("reference"):
            old_logprobs = (_logprobs_no_grad(model, batch, cfg.micro_batch_size, cfg.temperature, autocast)
                            if cfg.num_iterations > 1 else None)
            ref_logprobs = (reference_logprobs(model, ref_model, batch, cfg.micro_batch_size, cfg.temperature, autocast)
                            if cfg.beta != 0.0 else None)

        # 4. num_iterations optimizer updates on this rollout, micro-batched with gradient accumulation
        sums: dict[str, float] = {}
        entropy_sum, grad_norms, skipped = 0.0, [], 0
        W = dist.world_size
        for _ in range(cfg.num_iterations):
            with timer("backward"):
                for s in range(0, B, cfg.micro_batch_size):
                    rows = slice(s, s + cfg.micro_batch_size)
                    mb = batch.rows(rows)  # cut to its own widths: completion columns [:w] of the batch
                    w = mb.completion_width
                    # dapo is normalized by the step's token count already; the per-batch means of the
                    # other types are weighted by their share of the step's rows so the step's loss is
                    # their mean. DDP averages gradients over ranks, so the backward is scaled by W.
                    weight = 1.0 if cfg.loss_type == "dapo" else mb.input_ids.shape[0] / (B * W)
                    metrics, entropy = micro_batch_backward(
                        train_model, mb, None if old_logprobs is None else old_logprobs[rows, :w],
                        None if ref_logprobs is None else ref_logprobs[rows, :w], advantages[rows], cfg,
                        num_items, weight * W, sync=s + cfg.micro_batch_size >= B, autocast=autocast)
                    for k, v in metrics.items():  # this rank's share; summed over ranks at log time
                        sums[k] = sums.get(k, 0.0) + v * (weight if k in ("grpo_loss", "policy_loss", "kl_loss")
                                                          else mb.completion_mask.sum().item() / num_items)
                    entropy_sum += entropy
            with timer("optimizer"):
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
                grad_norms.append(grad_norm)
                finite = torch.tensor(float(math.isfinite(grad_norm) and math.isfinite(sums.get("grpo_loss", 0.0))))
                if dist.all_reduce(finite.to(device), "min").item() == 1.0:  # every rank steps, or none
                    optimizer.step()
                else:
                    skipped += 1
                optimizer.zero_grad(set_to_none=True)
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
        step += 1

        # 5. log: metrics over all ranks' completions, times of the slowest rank
        n_iter = cfg.num_iterations
        times = timer.totals
        time_per_step = time.perf_counter() - step_start
        phases = ("generation", "backward", "reference", "optimizer")
        slowest = dist.all_reduce(torch.tensor([time_per_step, *(times.get(p, 0.0) for p in phases),
                                                *_peak_memory_gb(device)], device=device, dtype=torch.float64), "max")
        time_per_step, *phase_times, peak_memory, peak_reserved = slowest.tolist()
        times = dict(zip(phases, phase_times))
        keys = sorted(sums)
        summed = dist.all_reduce(torch.tensor([sums[k] for k in keys] + [entropy_sum], device=device,
                                              dtype=torch.float64)).tolist()
        sums, entropy_sum = dict(zip(keys, summed[:-1])), summed[-1]
        per_completion = torch.tensor([[len(c), t] for c, t in zip(completions, truncated)], device=device)
        lengths, truncated = dist.all_gather(per_completion).cpu().T.tolist()
        group_std = rewards.view(-1, G).std(dim=1)
        record = {
            "timestamp_iso": now_iso(), "step": step, "epoch": round(epoch, 4), "device": device, "seed": cfg.seed,
            **{k: v / n_iter for k, v in sums.items()},
            "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
            "adv_mean": all_advantages.mean().item(), "adv_std": all_advantages.std().item(),
            "grad_norm": grad_norms[-1], "learning_rate": lr,
            "time_per_step_s": time_per_step, "generation_time_s": times["generation"],
            "backward_time_s": times["backward"],
            "other_time_s": time_per_step - times["generation"] - times["backward"],
            "reference_time_s": times["reference"], "optimizer_time_s": times["optimizer"],
            "tokens_generated": sum(lengths), "entropy": entropy_sum / (num_items * n_iter),
            "completion_len_mean": sum(lengths) / len(lengths), "completion_len_min": min(lengths),
            "completion_len_max": max(lengths), "clipped_ratio": sum(truncated) / len(truncated),
            "frac_reward_zero_std": (group_std == 0).float().mean().item(),
            "peak_memory_gb": peak_memory, "peak_memory_reserved_gb": peak_reserved, "skipped_updates": skipped,
            "world_size": dist.world_size,
        }
        if cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == total_steps):
            record.update(run_eval())
        if log:
            log.write(record)
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward_mean']:.2f}", s_step=f"{time_per_step:.1f}")

        # 6. say what is wrong, loudly
        nonfinite_in_row = nonfinite_in_row + 1 if skipped else 0
        if nonfinite_in_row >= MAX_NONFINITE:
            if log:
                log.close()
            bar.close()
            raise UserError(f"{MAX_NONFINITE} steps in a row had a non-finite loss or gradient norm (last at step "
                            f"{step}); updates were skipped and the last checkpoint in {out / CHECKPOINT} is intact. "
                            f"Lower --learning_rate or check the model's dtype")
        bad = record["clipped_ratio"] > 0.5 or record["frac_reward_zero_std"] == 1.0
        bad_signal_steps = bad_signal_steps + 1 if bad else 0
        if bad_signal_steps >= WARN_AFTER and not warned and dist.is_main:
            warned = True
            tqdm.write(f"warning: for {WARN_AFTER} steps clipped_ratio was {record['clipped_ratio']:.2f} (> 0.5 means "
                       f"completions are cut at --max_completion_length) or every group had equal rewards "
                       f"(frac_reward_zero_std {record['frac_reward_zero_std']:.2f}: no learning signal). Likely "
                       f"fixes: run SFT first so the model answers '#### N' and stops, raise "
                       f"--max_completion_length, or use more --num_generations")
        if step % cfg.save_every == 0 or step == total_steps:
            rng_states = dist.gather_objects(rng_state())
            if dist.is_main:
                save_checkpoint(out, model, optimizer, scheduler, step, total_steps, cfg.lora, rng_states)
    bar.close()
    if log:
        log.close()
    if not dist.is_main:
        dist.barrier()  # wait for rank 0's final model, so the job ends when the run is complete
        return record

    def write_final(tmp: Path) -> None:
        final = (merged_copy_for_saving(model, start_model, str(out / "adapter"), weight_dtype) if cfg.lora
                 else model)
        final.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    if cfg.lora:
        atomic_dir(out / "adapter", model.save_pretrained)
    atomic_files_into(out, write_final)
    print(f"saved: final model + tokenizer in {out}")
    dist.barrier()
    return record

