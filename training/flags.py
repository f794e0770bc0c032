"""The flags both trainers share for watching a run, declared once (SFTConfig and GRPOConfig take them)."""

from __future__ import annotations

from dataclasses import dataclass

from common.flags import flag

WATCH = "watching the run"


@dataclass
class WatchFlags:
    report_to: tuple[str, ...] = flag((), "send every number of the log to a tracker: tensorboard, wandb or trackio "
                                          "(give it several times for several; the JSONL log is written either way)",
                                      group=WATCH)
    run_name: str | None = flag(None, "the run's name in the tracker (default: the output folder's name)",
                                group=WATCH)
    logging_dir: str | None = flag(None, "where the trackers write (default: <output folder>/tracker)", group=WATCH)
