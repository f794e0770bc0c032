"""The GRPO run: set up the policy, then the outer loop around `grpo.step.grpo_step`.

    policy <- the SFT model (LoRA or full fine-tuning), a frozen reference, AdamW, the LR schedule
    for step in 1..max_steps:
        stats <- grpo_step(policy, this rank's prompts)       (grpo/step.py: rollout -> update)
        log step_record(stats) as one JSONL line; eval every --eval_every; checkpoint every --save_every
        warn once when completions are cut or no group has a signal; stop after 3 non-finite steps
    save the final model (LoRA merged) + tokenizer in HF format

The settings are grpo/config.py's (each a flag of train_grpo.py); where the step departs from the
paper's algorithm, and why, is said at the top of grpo/step.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.distributed import Dist, check_4bit, current, wrap_ddp
from common.errors import UserError, fail
from common.flags import check
from common.run_files import CHECKPOINT, now_iso, seed_everything
from common.schedule import adamw, make_scheduler
from data.prompt import check_thinking, prompts_within, resolve_format, warn_thinking
from grpo.config import GRPOConfig
from grpo.memory import LedgerSettings, check_fit
from grpo.policy import Policy
from grpo.prompt_order import extra_prompts, step_prompts
from grpo.record import StepStats, shown_completions, step_record
from grpo.step import grpo_step
from models import default_device, frozen_copy, load_model_and_tokenizer, load_tokenizer
from models.logprobs import HeadOptional
from models.lora import add_lora
from rewards.functions import RewardSettings, TrainerState, named
from sampling import Sampler, SamplingParams
from sampling.cuda_graphs import use_cuda_graphs
from training.run import Run, check_lengths, check_watch, restores_signals, run_data

LOG_NAME = "grpo_training_logs.jsonl"
WARN_AFTER = 10  # steps of a bad signal before the one warning
MAX_NONFINITE = 3  # non-finite steps in a row before the run stops

__all__ = ["LOG_NAME", "GRPOConfig", "train_grpo"]


def _validate(cfg: GRPOConfig, dist: Dist, device: str) -> None:
    check(cfg)
    check_watch(cfg)
    if cfg.prompts_per_step % dist.world_size:
        fail(f"--prompts_per_step {cfg.prompts_per_step} does not split across {dist.world_size} processes; "
             f"use a multiple of {dist.world_size} (a group of samples never spans processes)")
    check_4bit(cfg.use_4bit, dist, device)
    use_cuda_graphs(cfg.cuda_graphs, device)  # --cuda_graphs on off CUDA: one line


def _start_model(cfg: GRPOConfig) -> str:
    if cfg.model_name:
        return cfg.model_name
    if not (Path(cfg.sft_output) / "config.json").is_file():
        fail(f"no SFT model in {cfg.sft_output}: run train_sft.py first, or pass --model_name (e.g. tiny)")
    return cfg.sft_output


def _rewards(cfg: GRPOConfig, reward_funcs: list[Any] | None, thinking: bool) -> list[tuple[str, Any, float]]:
    """(name, function, weight) of each reward: the API's functions, else --reward; checked before any work."""
    funcs = named(reward_funcs if reward_funcs is not None else cfg.reward,
                  RewardSettings(cfg.max_completion_length, cfg.overlong_cache, thinking))
    if not funcs:
        fail("no reward: give --reward (numeric, format or module:function) at least once")
    weights = cfg.reward_weights or (1.0,) * len(funcs)
    if len(weights) != len(funcs):
        fail(f"{len(weights)} --reward_weights for {len(funcs)} reward(s): give one weight per --reward, in order")
    return [(name, fn, float(w)) for (name, fn), w in zip(funcs, weights)]


def _policy(cfg: GRPOConfig, start_model: str, dist: Dist, device: str, total_steps: int,
            rewards: list[tuple[str, Any, float]], fmt: Any) -> Policy:
    """The model to train (fp32 master weights for full fine-tuning: bf16 weights drop lr-1e-6 updates;
    compute is bf16 autocast on CUDA), its frozen reference, AdamW and the LR schedule."""
    cuda = device.startswith("cuda")
    model, tokenizer = load_model_and_tokenizer(start_model, device=device, load_in_4bit=cfg.use_4bit,
                                                dtype=torch.bfloat16 if (cuda and cfg.lora) else torch.float32)
    ref_model = None
    if cfg.lora:
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, 0.0, cfg.gradient_checkpointing)
    else:
        if cfg.beta != 0.0:
            ref_model = frozen_copy(model, torch.bfloat16 if cuda else torch.float32)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], device, cfg.learning_rate,
                      cfg.weight_decay, (0.9, cfg.adam_beta2))
    updates = total_steps * cfg.num_iterations
    scheduler = make_scheduler(optimizer, updates, int(cfg.warmup_ratio * updates), cfg.lr_decay)
    # under DDP, the forward that gives hidden states goes through the wrapper: the loss still projects them
    train_model = wrap_ddp(HeadOptional(model) if dist.enabled else model, dist, device)
    sampler = Sampler.for_tokenizer(model, tokenizer, cuda_graphs=use_cuda_graphs(cfg.cuda_graphs, device))
    return Policy(model, train_model, ref_model, tokenizer, optimizer, scheduler, device, rewards, sampler, fmt)


def _fitting_prompts(cfg: GRPOConfig, policy: Policy, records: list[Any], dist: Dist) -> tuple[list[Any], int]:
    """The training records whose prompt fits --max_prompt_length, and how many were skipped (said once)."""
    kept, _, skipped = prompts_within(policy.tokenizer, records, cfg.max_prompt_length, fmt=policy.prompt)
    check_lengths(len(kept), skipped, len(records), "prompt", "--max_prompt_length", cfg.max_prompt_length, dist,
                  "logged as prompts_skipped")
    return kept, skipped


def ledger_settings(cfg: GRPOConfig, start_model: str, fmt: Any, records: list[Any],
                    processes: int = 1) -> LedgerSettings:
    """The memory ledger's settings for one GPU of this run: its model, its share of the step's prompts
    (of `processes`) and the longest training prompt."""
    _, prompts, _ = prompts_within(load_tokenizer(start_model), records, cfg.max_prompt_length, fmt=fmt)
    return LedgerSettings(model=start_model, finetune=cfg.finetune, use_4bit=cfg.use_4bit,
                          prompts_per_step=cfg.prompts_per_step // processes, num_generations=cfg.num_generations,
                          micro_batch_size=cfg.micro_batch_size, prompt_tokens=max(map(len, prompts), default=1),
                          completion_tokens=cfg.max_completion_length, beta=cfg.beta, lora_r=cfg.lora_r,
                          gradient_checkpointing=cfg.gradient_checkpointing)


def _draw_more(cfg: GRPOConfig, records: list[Any], step: int, dist: Dist) -> Any:
    """--dynamic_sampling's source of further prompts for `step`: attempt -> this rank's records."""
    def draw(attempt: int) -> list[Any]:
        return [records[i] for i in extra_prompts(step, attempt, len(records), cfg.prompts_per_step, cfg.seed,
                                                  dist.rank, dist.world_size)]
    return draw


def _nonfinite(step: int, out: Path) -> str:
    return (f"{MAX_NONFINITE} steps in a row had a non-finite loss or gradient norm (last at step {step}); updates "
            f"were skipped and the last checkpoint in {out / CHECKPOINT} is intact. Lower --learning_rate or check "
            f"the model's dtype")


def _warning(record: dict[str, Any]) -> str:
    return (f"warning: for {WARN_AFTER} steps clipped_ratio was {record['clipped_ratio']:.2f} (> 0.5 means "
            f"completions are cut at --max_completion_length) or every group had equal rewards "
            f"(frac_reward_zero_std {record['frac_reward_zero_std']:.2f}: no learning signal). Likely "
            f"fixes: run SFT first so the model answers '#### N' and stops, raise --max_completion_length, "
            f"or use more --num_generations")


@dataclass
class _Watch:
    """The run's alarms: a warning once after WARN_AFTER steps in a row of cut completions or no group
    with a signal; a stop after MAX_NONFINITE steps in a row whose update was skipped (non-finite)."""

    nonfinite_in_row: int = 0
    bad_signal_steps: int = 0
    warned: bool = False

    def stop(self, record: dict[str, Any], skipped: int, say: Any) -> bool:
        """Count this step's `record`; `say` prints the warning (None: not this rank). True: stop the run."""
        self.nonfinite_in_row = self.nonfinite_in_row + 1 if skipped else 0
        if self.nonfinite_in_row >= MAX_NONFINITE:
            return True
        bad = record["clipped_ratio"] > 0.5 or record["frac_reward_zero_std"] == 1.0
        self.bad_signal_steps = self.bad_signal_steps + 1 if bad else 0
        if self.bad_signal_steps >= WARN_AFTER and not self.warned and say is not None:
            self.warned = True
            say(_warning(record))
        return False


@dataclass
class _Setup:
    """What the run is: its start model, prompt format, rewards, data and length, checked before any work."""

    start_model: str
    fmt: Any
    rewards: list[tuple[str, Any, float]]
    train_records: list[dict[str, Any]]
    eval_sets: Any
    total_steps: int


def _setup(cfg: GRPOConfig, dist: Dist, device: str, reward_funcs: list[Any] | None,
           train_records: list[dict[str, Any]] | None, eval_records: list[dict[str, Any]] | None) -> _Setup:
    """Check the settings, resolve the start model, format, rewards and data, seed, count the steps and
    (on CUDA, --fit_check) whether the step fits: all before the model loads."""
    _validate(cfg, dist, device)
    start_model = _start_model(cfg)
    fmt = resolve_format(cfg, start_model)
    check_thinking(fmt, start_model, load_tokenizer)
    if dist.is_main:
        warn_thinking(fmt, cfg.max_completion_length, False, "GRPO's rollouts")
        warn_thinking(fmt, cfg.eval_max_new_tokens or cfg.max_completion_length, cfg.eval_every > 0,
                      "GRPO's held-out evals")
    rewards = _rewards(cfg, reward_funcs, fmt.thinking)
    train_records, eval_sets = run_data(cfg, train_records, eval_records)
    seed_everything(cfg.seed)
    steps_per_epoch = max(1, len(train_records) // cfg.prompts_per_step)  # counted before long prompts go
    total_steps = cfg.max_steps or max(1, int(cfg.num_epochs * steps_per_epoch))
    if cfg.fit_check and device.startswith("cuda"):  # before the model loads: will the step fit?
        peak = check_fit(ledger_settings(cfg, start_model, fmt, train_records, dist.world_size), device)
        if dist.is_main:
            print(f"memory ledger: this run peaks at about {peak:.2f} GB on {device} (python -m benchmarks.memory)")
    return _Setup(start_model, fmt, rewards, train_records, eval_sets, total_steps)


def _evaluator(cfg: GRPOConfig, run: Run, policy: Policy, eval_sets: Any) -> Any:
    """step -> the held-out eval's log fields (greedy, every eval set) at that step."""
    def evaluate(at: int | None = None) -> dict[str, float]:
        # the rollouts' settings, its own graph state (freed on return), graphs off after a failed capture
        sampler = policy.sampler.replace(batch_size=cfg.eval_batch_size, continuous=True)
        params = SamplingParams(max_new_tokens=cfg.eval_max_new_tokens or cfg.max_completion_length)
        with policy.autocast():
            return run.evaluate_sets(sampler, policy.tokenizer, eval_sets, params, step=at,
                                     max_prompt_length=cfg.max_prompt_length, prompt_format=policy.prompt)[1]
    return evaluate


def _write_completions(cfg: GRPOConfig, run: Run, dist: Dist, stats: StepStats, step: int, say: Any) -> None:
    """--log_completions' lines of every rank, once, in rank order; --print_completions' block on the console."""
    if stats.completions_log is None:
        return
    rows = [r for rank_rows in dist.gather_objects(stats.completions_log) for r in rank_rows]
    if cfg.log_completions != "0":
        n = None if cfg.log_completions == "all" else int(cfg.log_completions) * cfg.num_generations
        run.write_completions(rows[:n], step)
    if cfg.print_completions and dist.is_main:
        say(shown_completions(rows[: cfg.print_completions], step))


@restores_signals
def train_grpo(cfg: GRPOConfig, rollout: Any = None, reward_funcs: list[Any] | None = None,
               train_records: list[dict[str, Any]] | None = None,
               eval_records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run GRPO as configured; returns the last log record.

    The Python API: `reward_funcs` (functions, called as TRL calls rewards: rewards/functions.py; or names
    as --reward takes them) replace `cfg.reward`, weighted by `cfg.reward_weights`; `train_records` /
    `eval_records` (dicts with the question and answer columns `cfg` names, other keys reaching the
    rewards) replace `cfg.dataset`. `rollout(step, prompts, answers)` stands in for sampling (tests, the
    DDP check): it returns each prompt's G completions as token ids, or `sampling.Completions` whose
    `logprobs` stand in for the sampler's, or None to sample; it is kept as `Policy.rollout`."""
    from tqdm.auto import tqdm

    dist = current()
    device = cfg.device or default_device()
    setup = _setup(cfg, dist, device, reward_funcs, train_records, eval_records)
    start_model, total_steps = setup.start_model, setup.total_steps
    # the output folder is prepared (an --overwrite'n run deleted) only once the data and the fit are known
    run = Run(cfg, dist, out=cfg.grpo_output, flag="--grpo_output", stage="grpo", log_name=LOG_NAME,
              start_model=start_model)
    policy = _policy(cfg, start_model, dist, device, total_steps, setup.rewards, setup.fmt)
    policy.rollout = rollout
    train_records, skipped = _fitting_prompts(cfg, policy, setup.train_records, dist)
    if dist.rank > 0:
        seed_everything(cfg.seed + dist.rank)  # each rank samples its own completions
    step = run.start(policy.model, policy.optimizer, policy.scheduler, cfg.lora, device, total_steps)
    evaluate = _evaluator(cfg, run, policy, setup.eval_sets)
    if step == 0 and cfg.eval_every > 0:  # the starting point, so the curve has its baseline
        run.write({"timestamp_iso": now_iso(), "step": 0, "epoch": 0.0, "device": device, "seed": cfg.seed,
                   "world_size": dist.world_size, **evaluate(0)})
    watch, record, say = _Watch(), {}, tqdm.write if dist.is_main else None
    how = dict(lora=cfg.lora, base_model=start_model, prompt_format=setup.fmt,  # how models are saved
               dtype=torch.bfloat16 if (device.startswith("cuda") and cfg.lora) else torch.float32)
    bar = run.progress("grpo", total_steps, step)
    while step < total_steps:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        indices, epoch = step_prompts(step, len(train_records), cfg.prompts_per_step, cfg.seed, dist.rank,
                                      dist.world_size)
        stats = grpo_step(policy, cfg, dist, [train_records[i] for i in indices], step,
                          draw_more=_draw_more(cfg, train_records, step, dist),
                          state=TrainerState(step, total_steps, epoch))
        step += 1
        if policy.sampler.graphs is not None and device.startswith("cuda"):  # the graphed state stays while it fits
            total = torch.cuda.get_device_properties(device).total_memory
            policy.sampler.measured(torch.cuda.max_memory_allocated(), total,
                                    longest=max(stats.lengths, default=0) >= cfg.max_completion_length)
        record = {"timestamp_iso": now_iso(), "step": step, "epoch": round(epoch, 4), "device": device,
                  "seed": cfg.seed, **step_record(stats, cfg, dist, device, time.perf_counter() - start),
                  "prompts_skipped": skipped}
        if cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == total_steps):
            record.update(evaluate(step))
        run.write(record)
        _write_completions(cfg, run, dist, stats, step, tqdm.write)
        bar.update(step, reward=f"{record['reward_mean']:.3f}", zero_signal=f"{record['frac_reward_zero_std']:.2f}",
                   s_step=f"{record['time_per_step_s']:.2f}",
                   **({"eval_accuracy": f"{record['eval_accuracy']:.3f}"} if "eval_accuracy" in record else {}))
        if watch.stop(record, stats.skipped, say):
            run.close()
            bar.close()
            raise UserError(_nonfinite(step, run.out))
        run.keep(step, total_steps, record, policy.model, policy.tokenizer, **how)
        run.checkpoint(step, total_steps, policy.model, policy.optimizer, policy.scheduler, cfg.lora)
    bar.close()
    run.save_final(policy.model, policy.tokenizer, message=f"saved: final model + tokenizer in {run.out}", **how)
    return record
