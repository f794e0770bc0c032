"""The flags both trainers share for watching a run, declared once (SFTConfig and GRPOConfig take them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from common.flags import Rule, flag

WATCH, KEEP = "watching and publishing the run", "keeping models along the way"


@dataclass
class WatchFlags:
    report_to: tuple[str, ...] = flag((), "send every number of the log to a tracker: tensorboard, wandb or trackio "
                                          "(give it several times for several; the JSONL log is written either way)",
                                      group=WATCH, on_resume="may")
    run_name: str | None = flag(None, "the run's name in the tracker (default: the output folder's name)",
                                group=WATCH, on_resume="may")
    logging_dir: str | None = flag(None, "where the trackers write (default: <output folder>/tracker, or "
                                         "W&B's $WANDB_DIR)", group=WATCH, on_resume="may")
    push_to_hub: str | None = flag(None, "upload the final model and its model card to this hub repository "
                                         "(NAMESPACE/NAME; name, token and the hub's reach checked before training)",
                                   group=WATCH, on_resume="may")
    save_model_every: int = flag(0, "keep a loadable model (LoRA merged) every N steps in snapshots/step_<N> "
                                    "(0: only the final one)", low=0, group=KEEP, on_resume="may")
    keep_snapshots: int | None = flag(None, "keep only the newest M snapshots (default: all)", low=1, group=KEEP,
                                      on_resume="may")
    keep_best: bool = flag(False, "keep the model with the best validation accuracy in best/, scored at every "
                                  "--eval_every on --validation_samples problems held back from the training "
                                  "data (never the test split the final comparisons use)", group=KEEP)
    save_models: bool = flag(True, "write checkpoints and models (--no_save: the log and evals only, as the "
                                   "benchmarks run; nothing to resume from or publish)", name="--no_save", group=KEEP)
    validation_samples: int = flag(100, "with --keep_best: training problems held back to choose the best model",
                                   low=1, group=KEEP)

    RULES: ClassVar[tuple[Rule, ...]] = (  # settings that contradict each other, checked with the ranges
        Rule(("keep_best", "eval_every"), lambda c: c.keep_best and c.eval_every == 0 and (
            "--keep_best picks the best model at each held-out eval; give --eval_every N too")),
        Rule(("keep_snapshots", "save_model_every"), lambda c: c.keep_snapshots and not c.save_model_every and (
            "--keep_snapshots keeps the newest of --save_model_every's snapshots; give --save_model_every N too")),
        Rule(("save_models", "push_to_hub", "keep_best", "save_model_every"), lambda c: _unsaved(c)),
    )


def _unsaved(c: WatchFlags) -> str | None:
    """--no_save with a flag that keeps or publishes a model."""
    kept = [name for name, on in (("--push_to_hub", c.push_to_hub), ("--keep_best", c.keep_best),
                                  ("--save_model_every", c.save_model_every)) if on]
    if not c.save_models and kept:
        return f"--no_save writes no model, so {' and '.join(kept)} would have nothing to keep; drop one or the other"
    return None
