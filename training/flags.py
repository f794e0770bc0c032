"""The flags both trainers share for watching a run, declared once (SFTConfig and GRPOConfig take them)."""

from __future__ import annotations

from dataclasses import dataclass

from common.flags import flag

WATCH, KEEP = "watching and publishing the run", "keeping models along the way"


@dataclass
class WatchFlags:
    report_to: tuple[str, ...] = flag((), "send every number of the log to a tracker: tensorboard, wandb or trackio "
                                          "(give it several times for several; the JSONL log is written either way)",
                                      group=WATCH)
    run_name: str | None = flag(None, "the run's name in the tracker (default: the output folder's name)",
                                group=WATCH)
    logging_dir: str | None = flag(None, "where the trackers write (default: <output folder>/tracker, or "
                                         "W&B's $WANDB_DIR)", group=WATCH)
    push_to_hub: str | None = flag(None, "upload the final model and its model card to this hub repository "
                                         "(NAMESPACE/NAME; name, token and the hub's reach checked before training)",
                                   group=WATCH)
    save_model_every: int = flag(0, "keep a loadable model (LoRA merged) every N steps in snapshots/step_<N> "
                                    "(0: only the final one)", low=0, group=KEEP)
    keep_snapshots: int | None = flag(None, "keep only the newest M snapshots (default: all)", low=1, group=KEEP)
    keep_best: bool = flag(False, "keep the model with the best validation accuracy in best/, scored at every "
                                  "--eval_every on --validation_samples problems held back from the training "
                                  "data (never the test split the final comparisons use)", group=KEEP)
    validation_samples: int = flag(100, "with --keep_best: training problems held back to choose the best model",
                                   low=1, group=KEEP)
