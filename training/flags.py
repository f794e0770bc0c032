"""The flags both trainers share for watching a run, declared once (SFTConfig and GRPOConfig take them)."""

from __future__ import annotations

from dataclasses import dataclass

from common.flags import flag

WATCH = "watching and publishing the run"


@dataclass
class WatchFlags:
    report_to: tuple[str, ...] = flag((), "send every number of the log to a tracker: tensorboard, wandb or trackio "
                                          "(give it several times for several; the JSONL log is written either way)",
                                      group=WATCH)
    run_name: str | None = flag(None, "the run's name in the tracker (default: the output folder's name)",
                                group=WATCH)
    logging_dir: str | None = flag(None, "where the trackers write (default: <output folder>/tracker)", group=WATCH)
    push_to_hub: str | None = flag(None, "upload the final model and its model card to this hub repository "
                                         "(NAMESPACE/NAME; the token and name are checked before training)",
                                   group=WATCH)
