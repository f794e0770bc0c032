"""What SFT and GRPO both do around their loop, in one place: the output folder and its
run_config.json, resuming, the JSONL log and the trackers it feeds (`--report_to`), the completions log,
held-out evals (each one's predictions kept), checkpoints with every rank's RNG state, and the final
save (LoRA adapter, merged model + tokenizer in HF format). Rank 0 alone writes."""

from __future__ import annotations

import functools
import json
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.distributed import Dist, launched_by_torchrun
from common.errors import Interrupted, fail
from common.flags import read_run_config, replayable, resume_changes, shown
from common.run_files import (
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
    write_json,
)
from data import main_eval_name, other_eval_sets, run_records, split_validation
from data.prompt import save_format
from eval.evaluate import eval_fields, evaluate, write_results
from models.card import write_model_card
from models.lora import merged_copy_for_saving
from models.push import check_push, push
from training.trackers import TRACKER_DIR, Trackers
from training.trackers import check as check_trackers


class Progress:
    """Progress of a training loop: the bar on a terminal; elsewhere (a pipe, a log file, CI, the demo)
    one line every tenth of the run, so a long stage is never silent. Rank 0 alone shows it."""

    def __init__(self, desc: str, total: int, initial: int, enabled: bool):
        from tqdm.auto import tqdm

        tty = sys.stderr.isatty()
        self.desc, self.total, self.every = desc, total, max(1, total // 10)
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not (enabled and tty))
        self.lines = enabled and not tty

    def update(self, step: int, **fields: str) -> None:
        self.bar.update(1)
        self.bar.set_postfix(**fields)
        if self.lines and (step % self.every == 0 or step == self.total):
            print(f"{self.desc} step {step}/{self.total}: " + ", ".join(f"{k} {v}" for k, v in fields.items()),
                  flush=True)

    def close(self) -> None:
        self.bar.close()


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM while a run trains (from `listen()`): the first lets the step in
    progress finish, then `Run.checkpoint` saves and stops the run; a second leaves at once
    (KeyboardInterrupt, losing the steps since the last checkpoint). The handlers are put back by
    `restores_signals`, which wraps each trainer."""

    FORWARDED_S = 1.0  # under torchrun, a signal this soon after the first is the agent forwarding it: the same one

    def __init__(self) -> None:
        self.requested: str | None = None
        self.first_at = 0.0

    def listen(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach Python's main thread only: a run in another thread keeps the default
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            # torchrun's agent passes the Ctrl-C it got on to its workers, which got the terminal's too
            if launched_by_torchrun() and time.monotonic() - self.first_at < self.FORWARDED_S:
                return
            raise KeyboardInterrupt
        self.requested, self.first_at = signal.Signals(signum).name, time.monotonic()
        print(f"\n{self.requested}: stopping after this step, with a checkpoint (again to leave at once, losing "
              f"the steps since the last checkpoint)", file=sys.stderr, flush=True)

    def agreed(self, dist: Dist, device: str) -> bool:
        """Whether any rank was asked to stop (every rank answers the same, so all save and stop together)."""
        if not dist.enabled:
            return self.requested is not None
        import torch

        asked = dist.all_reduce(torch.tensor(float(self.requested is not None), device=device), "max").item() > 0
        self.requested = self.requested or ("a signal to another process" if asked else None)
        return asked


def restores_signals(train: Callable[..., Any]) -> Callable[..., Any]:
    """`train` with the SIGINT/SIGTERM handlers it found put back when it returns or raises."""
    @functools.wraps(train)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        main = threading.current_thread() is threading.main_thread()
        saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
        try:
            return train(*args, **kwargs)
        finally:
            for sig, handler in saved.items():
                if handler is not None:  # None: set outside Python, cannot be put back from here
                    signal.signal(sig, handler)
    return wrapped


COMPLETIONS = "completions.jsonl"
RESUMES = "resumes.jsonl"  # one line per --resume: the step it continued from, the settings that changed
VALIDATION = "validation"  # --keep_best's held-back training problems: logged as eval_validation_*
BEST = "best.json"  # in <out>/best: the step and validation accuracy of the model kept there


def read_best(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / "best" / BEST).read_text())
    except (OSError, ValueError):
        return None


def check_watch(cfg: Any) -> None:
    """The watch flags (training/flags.py) both trainers check before any model loads, one line each (their
    rules between flags are WatchFlags.RULES, checked with the ranges)."""
    check_trackers(cfg.report_to)
    check_push(cfg.push_to_hub)


def run_data(cfg: Any, train_rows: list[Any] | None, eval_rows: list[Any] | None) -> tuple[list[Any],
                                                                                             dict[str, list[Any]]]:
    """A run's training records and its held-out sets by name: the main one first (`data.run_records`),
    then each further --eval_dataset, then with --keep_best the validation problems held back from the
    training records (never the test split)."""
    train, held_out = run_records(cfg, train_rows, eval_rows)
    sets = {main_eval_name(cfg, eval_rows): held_out, **other_eval_sets(cfg, eval_rows)}
    if cfg.keep_best:
        train, sets[VALIDATION] = split_validation(train, cfg.validation_samples, cfg.seed)
    return train, sets


def check_lengths(kept: int, skipped: int, total: int, what: str, flag: str, limit: int, dist: Dist,
                  logged_as: str) -> None:
    """Before training: none of the `total` training `what`s fits `flag`'s `limit` tokens is a one-line
    error; `skipped` of them not fitting is said once (on the main process)."""
    if not kept:
        fail(f"every training {what} is longer than {flag} {limit} tokens; raise {flag}")
    if skipped and dist.is_main:
        print(f"skipped {skipped} of {total} training {what}s longer than {flag} {limit} tokens ({logged_as})")


class Run:
    """One training run's folder. `cfg` needs `resume`, `overwrite`, `save_every`, `show_progress` and
    the watch flags (training/flags.py)."""

    def __init__(self, cfg: Any, dist: Dist, *, out: str, flag: str, stage: str, log_name: str,
                 **config_extra: Any):
        self.cfg, self.dist, self.out, self.log_name = cfg, dist, Path(out), log_name
        self.log: JsonlLog | None = None
        self.completions: JsonlLog | None = None
        self.trackers: Trackers | None = None
        self.config = {"stage": stage, **config_extra, **replayable(cfg), "world_size": dist.world_size}
        self.flag, self.stage, self.stop = flag, stage, StopSignals()
        # --resume continues the run as saved: a setting that would change it stops here, before the model loads
        self.changes = resume_changes(cfg, read_run_config(out, type(cfg), flag), str(self.out / RUN_CONFIG)) \
            if cfg.resume else {}

        def prepare() -> None:
            prepare_output_dir(self.out, resume=cfg.resume, overwrite=cfg.overwrite, flag=flag)
            if not cfg.resume:
                write_json(self.out / RUN_CONFIG, self.config)

        dist.on_main(prepare)

    def start(self, model: Any, optimizer: Any, scheduler: Any, lora: bool, device: str, total_steps: int) -> int:
        """The step to start from (the checkpoint's with --resume, else 0); opens the log (cut back to it)."""
        step, self.device = 0, device
        self.stop.listen()
        if self.cfg.resume:
            step = load_checkpoint(self.out, model, optimizer, scheduler, lora, device, self.dist.rank,
                                   self.dist.world_size)
            if step > total_steps:
                fail(f"--max_steps {total_steps} is below the checkpoint's step {step} in {self.out}: give at least "
                     f"{step}")
            if self.dist.is_main:
                self._record_resume(step)
                changed = ", ".join(f"{shown(type(self.cfg), k, a)} -> {shown(type(self.cfg), k, b)}"
                                    for k, (a, b) in self.changes.items())
                print(f"resuming {self.out} at step {step}/{total_steps}"
                      + (f" (changed: {changed})" if changed else ""))
        if self.dist.is_main:
            resumed = step if self.cfg.resume else None
            self.log = JsonlLog(self.out / self.log_name, resume_step=resumed)
            if self.cfg.resume and (self.out / COMPLETIONS).exists():
                self.completions = JsonlLog(self.out / COMPLETIONS, resume_step=step)  # cut back like the log
            self.trackers = Trackers(self.cfg.report_to, Path(self.cfg.logging_dir or self.out / TRACKER_DIR),
                                     self.cfg.run_name or self.out.resolve().name, self.config, resumed, self.out)
        return step

    def _record_resume(self, step: int) -> None:
        """The resumed run's files say what it trains with: run_config.json takes the settings that changed
        (`self.changes`, each allowed by its flag's on_resume), and resumes.jsonl keeps one line per resume:
        the step it continued from and each change, {field: [saved, now]}."""
        if self.changes:
            saved = json.loads((self.out / RUN_CONFIG).read_text())
            write_json(self.out / RUN_CONFIG, {**saved, **{k: self.config[k] for k in self.changes}})
        log = JsonlLog(self.out / RESUMES)
        log.write({"timestamp_iso": now_iso(), "step": step, "changed": {k: list(v) for k, v in self.changes.items()}})
        log.close()

    def write(self, record: dict[str, Any]) -> None:
        """One line of the JSONL log, and its numbers to the trackers."""
        if self.log:
            self.log.write(record)
        if self.trackers:
            self.trackers.log(record)

    def write_completions(self, rows: list[dict[str, Any]], step: int) -> None:
        """Lines of completions.jsonl (rank 0 passes every rank's), and the same rows to the trackers."""
        if not self.dist.is_main or not rows:
            return
        if self.completions is None:
            self.completions = JsonlLog(self.out / COMPLETIONS)
        for row in rows:
            self.completions.write(row)
        if self.trackers:
            columns = list(rows[0])
            self.trackers.table("completions", columns, [[r.get(c) for c in columns] for r in rows], step)

    def progress(self, desc: str, total: int, initial: int) -> Progress:
        return Progress(desc, total, initial, self.cfg.show_progress and self.dist.is_main)

    def evaluate(self, sampler: Any, tokenizer: Any, records: list[Any], params: Any, step: int | None = None,
                 name: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """Held-out eval of `sampler`'s model with `params` (a `SamplingParams`; every rank takes its share),
        written to <out>/eval (a named set other than the main one: <out>/eval/<name>) and, for an eval
        during training (`step`), also kept in <out>/eval/step_<step>[/<name>]; the model is left in train
        mode."""
        summary, predictions = evaluate(sampler, tokenizer, records, params, show_progress=self.cfg.show_progress,
                                        **kwargs)
        if self.dist.is_main:
            write_results(self.out / "eval" / (name or ""), summary, predictions)
            if step is not None:
                write_results(self.out / "eval" / f"step_{step}" / (name or ""), summary, predictions)
        sampler.model.train()
        return summary

    def evaluate_sets(self, sampler: Any, tokenizer: Any, sets: dict[str, list[Any]], params: Any,
                      step: int | None = None, **kwargs: Any) -> tuple[dict[str, Any], dict[str, float]]:
        """Every held-out set (the first is the main one): (the main set's summary, the log fields: eval_*
        of the main set and, when there are several, eval_<name>_* of each)."""
        main, fields = {}, {}
        for i, (name, records) in enumerate(sets.items()):
            summary = self.evaluate(sampler, tokenizer, records, params, step, None if i == 0 else name, **kwargs)
            if i == 0:
                main, fields = summary, eval_fields(summary)
            if len(sets) > 1:
                fields.update(eval_fields(summary, prefix=f"eval_{name}_"))
        return main, fields

    def checkpoint(self, step: int, total_steps: int, model: Any, optimizer: Any, scheduler: Any,
                   lora: bool) -> None:
        """Every `save_every` steps and at the last: everything --resume needs, atomically (never with
        --no_save). After a SIGINT/SIGTERM (`StopSignals`) also now, and then the run stops (`Interrupted`),
        saying how to resume."""
        stopping = self.stop.agreed(self.dist, self.device)
        if self.cfg.save_models and (step % self.cfg.save_every == 0 or step == total_steps or stopping):
            rng_states = self.dist.gather_objects(rng_state())
            if self.dist.is_main:
                save_checkpoint(self.out, model, optimizer, scheduler, step, total_steps, lora, rng_states)
        if stopping and step < total_steps:  # at the last step the run ends as it would have: saved whole
            self.close()
            launcher = f"torchrun --nproc_per_node {self.dist.world_size} " if self.dist.world_size > 1 else "python "
            if not self.cfg.save_models:
                raise Interrupted("" if not self.dist.is_main else f"interrupted ({self.stop.requested}) after step "
                                  f"{step}/{total_steps}; --no_save: nothing to resume from")
            raise Interrupted("" if not self.dist.is_main else
                              f"interrupted ({self.stop.requested}) after step {step}/{total_steps}; checkpoint in "
                              f"{self.out / CHECKPOINT}. Resume with: {launcher}train_{self.stage}.py --resume "
                              f"{self.flag} {shlex.quote(str(self.out))}")

    def close(self) -> None:
        for log in (self.log, self.completions):
            if log:
                log.close()
        self.log = self.completions = None
        if self.trackers:
            self.trackers.close()
            self.trackers = None

    def _write_model(self, target: Path, model: Any, tokenizer: Any, *, lora: bool, base_model: str, dtype: Any,
                     prompt_format: Any, whole_folder: bool) -> None:
        """A loadable model in `target`: the LoRA adapter in <target>/adapter and the model merged into a
        fresh base, or the model itself; the tokenizer, the prompt format and the model card beside it.
        `whole_folder`: swap in a new folder (snapshots, best/); else files into the run folder."""
        def write(tmp: Path) -> None:
            if lora:
                adapter = (tmp if whole_folder else target) / "adapter"
                if whole_folder:
                    model.save_pretrained(adapter)
                else:
                    atomic_dir(adapter, model.save_pretrained)
            final = merged_copy_for_saving(model, base_model, str(adapter), dtype) if lora else model
            final.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if prompt_format is not None:
                save_format(prompt_format, tmp)
            if whole_folder:
                write_json(tmp / RUN_CONFIG, self.config)

        if whole_folder:
            atomic_dir(target, write)
        else:
            atomic_files_into(target, write)
        write_model_card(target)

    def keep(self, step: int, total_steps: int, fields: dict[str, Any], model: Any, tokenizer: Any,
             **how: Any) -> None:
        """--save_model_every's snapshots (the newest --keep_snapshots of them) and --keep_best's best/ by
        the validation accuracy in this step's eval `fields`; `how` is `_write_model`'s keywords."""
        if not self.dist.is_main:
            return
        every, keep = self.cfg.save_model_every, self.cfg.keep_snapshots
        if every and step % every == 0 and step < total_steps:
            self._write_model(self.out / "snapshots" / f"step_{step}", model, tokenizer, whole_folder=True, **how)
            kept = sorted((p for p in (self.out / "snapshots").glob("step_*") if p.name[5:].isdigit()),
                          key=lambda p: int(p.name[5:]))
            for old in kept[: -keep] if keep else []:
                shutil.rmtree(old)
        score = fields.get(f"eval_{VALIDATION}_accuracy")
        if self.cfg.keep_best and score is not None:
            best = read_best(self.out)
            if best is None or score > best["validation_accuracy"]:
                self._write_model(self.out / "best", model, tokenizer, whole_folder=True, **how)
                write_json(self.out / "best" / BEST, {"step": step, "validation_accuracy": score})
                print(f"best so far: step {step}, validation accuracy {score:.3f} (kept in {self.out / 'best'})")

    def save_final(self, model: Any, tokenizer: Any, *, lora: bool, base_model: str, dtype: Any,
                   message: str, prompt_format: Any = None) -> None:
        """The trained model where `from_pretrained(<out>)` finds it (LoRA merged into a fresh base, the
        adapter also in <out>/adapter), the prompt format it was trained with beside it (the next stage
        reads it) and its model card (README.md), then `message`; pushed to the hub with --push_to_hub.
        Other ranks wait for it, so the job ends complete. With --no_save: nothing is written."""
        self.close()
        if self.dist.is_main and not self.cfg.save_models:
            print(f"--no_save: no model written; the log and evals are in {self.out}")
        elif self.dist.is_main:
            self._write_model(self.out, model, tokenizer, lora=lora, base_model=base_model, dtype=dtype,
                              prompt_format=prompt_format, whole_folder=False)
            print(message)
            if self.cfg.push_to_hub:
                print(f"pushed to {push(self.out, self.cfg.push_to_hub)}")
        self.dist.barrier()
