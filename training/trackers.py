"""Sending a run's log to a tracker, as TRL users watch theirs: TensorBoard, Weights & Biases, Trackio.

The JSONL log stays the source of truth; a tracker gets every finite number of each log line under a
grouped name (`tracked`), from rank 0 only. A resumed run continues the same curves without duplicate
steps: TensorBoard purges the events past the checkpoint (`purge_step`), W&B and Trackio resume the run
whose id the first start stored in the output folder. No tracker package is a requirement: `check`
says in one line which one is missing, before any model loads.

To add a tracker: a class with `package` (what it imports), `log(metrics, step)`, `table(name, columns,
rows, step)` and `close()`, and one entry in BACKENDS.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

from common.errors import fail
from common.run_files import is_measured, write_json

PROJECT = os.environ.get("WANDB_PROJECT") or "qwen-gsm8k-grpo"  # W&B's and Trackio's project
RUN_ID = "tracker_run_id.json"  # in the output folder: each tracker's run id, for --resume
TRACKER_DIR = "tracker"  # in the output folder: where the trackers write unless --logging_dir says
# the run's settings, in each log line for the record: the tracker has them in its config, not as curves
CONFIG_FIELDS = ("seed", "world_size")


def metric_name(field: str) -> str:
    """A log field's name in the tracker: eval_accuracy -> eval/accuracy, reward_mean -> reward/mean,
    adv_std -> reward/adv_std, generation_time_s -> time/generation_time_s, peak_memory_gb ->
    system/peak_memory_gb, the rest under train/."""
    if field.startswith("eval_"):
        return "eval/" + field.removeprefix("eval_")
    if field.startswith("reward_"):
        return "reward/" + field.removeprefix("reward_")
    if field.startswith("adv_"):
        return "reward/" + field
    if field.startswith("peak_memory"):
        return "system/" + field
    if is_measured(field):
        return "time/" + field
    return "train/" + field


def tracked(record: dict[str, Any]) -> dict[str, float]:
    """Every finite number of a log line (not its step, not booleans or text, not the run's settings in
    CONFIG_FIELDS) under its grouped name."""
    return {metric_name(k): float(v) for k, v in record.items()
            if k != "step" and k not in CONFIG_FIELDS and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


def own_folder(log_dir: Path, out: Path) -> bool:
    """Whether the trackers write in the run's own folder (no --logging_dir)."""
    return log_dir == out / TRACKER_DIR


class TensorBoard:
    package = "tensorboard"

    def __init__(self, log_dir: Path, name: str, config: dict[str, Any], resume_step: int | None, out: Path):
        from torch.utils.tensorboard import SummaryWriter

        # TensorBoard names a run by its folder under --logdir: in the run's own folder a subfolder named
        # after the run would show as `watch/tracker/watch`, so it gets one only for a --run_name of its own
        own = own_folder(log_dir, out) and name == out.resolve().name
        # purge_step: events at steps after the checkpoint (written before a crash) are dropped
        self.writer = SummaryWriter(log_dir=str(log_dir if own else log_dir / name),
                                    purge_step=None if resume_step is None else resume_step + 1)
        if resume_step is None:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        lines += ["| " + " | ".join(str(x).replace("|", "\\|").replace("\n", " ") for x in r) + " |" for r in rows]
        self.writer.add_text(name, "\n".join(lines), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _RunById:
    """W&B and Trackio: a run that a resumed training run continues, by the id stored in the folder."""

    package = ""  # also the module imported

    def __init__(self, log_dir: Path, name: str, config: dict[str, Any], resume_step: int | None, out: Path):
        import importlib

        self.lib = importlib.import_module(self.package)
        self.own = own_folder(log_dir, out)
        ids = _read_ids(out)
        run_id = ids.get(self.package) if resume_step is not None else None
        run_id = run_id or secrets.token_hex(4)
        _write_ids(out, {**ids, self.package: run_id})
        self.run = self.start(log_dir, name, config, run_id)

    def start(self, log_dir: Path, name: str, config: dict[str, Any], run_id: str) -> Any:
        raise NotImplementedError

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.lib.log(metrics, step=step)

    def table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self.lib.log({name: self.lib.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        self.lib.finish()


class WandB(_RunById):
    package = "wandb"

    def start(self, log_dir: Path, name: str, config: dict[str, Any], run_id: str) -> Any:
        # W&B's own WANDB_DIR wins over the default folder; --logging_dir wins over both
        if self.own and os.environ.get("WANDB_DIR"):
            log_dir = Path(os.environ["WANDB_DIR"])
        log_dir.mkdir(parents=True, exist_ok=True)
        return self.lib.init(project=PROJECT, name=name, id=run_id, resume="allow", dir=str(log_dir), config=config)


class Trackio(_RunById):
    package = "trackio"

    def start(self, log_dir: Path, name: str, config: dict[str, Any], run_id: str) -> Any:
        # Trackio names runs, not ids: the stored id keeps a resumed run's name and resumes it
        return self.lib.init(project=PROJECT, name=f"{name}-{run_id}", resume="allow", config=config)


BACKENDS = {"tensorboard": TensorBoard, "wandb": WandB, "trackio": Trackio}


def _read_ids(out: Path) -> dict[str, str]:
    try:
        return json.loads((out / RUN_ID).read_text())
    except (OSError, ValueError):
        return {}


def _write_ids(out: Path, ids: dict[str, str]) -> None:
    write_json(out / RUN_ID, ids)


def check(report_to: tuple[str, ...]) -> None:
    """One line, before any model loads, for an unknown tracker or one whose package is missing."""
    for name in report_to:
        if name not in BACKENDS:
            fail(f"--report_to must be one of {', '.join(BACKENDS)} (got {name})")
        package = BACKENDS[name].package
        if importlib.util.find_spec(package) is None:
            fail(f"--report_to {name} needs the {package} package: pip install {package} "
                 f"(or leave --report_to {name} out)")


class Trackers:
    """The run's trackers (none: every call does nothing). Rank 0 alone opens them."""

    def __init__(self, report_to: tuple[str, ...], log_dir: Path, name: str, config: dict[str, Any],
                 resume_step: int | None, out: Path):
        self.backends = [BACKENDS[r](log_dir, name, config, resume_step, out) for r in dict.fromkeys(report_to)]

    def log(self, record: dict[str, Any]) -> None:
        metrics = tracked(record)
        if metrics and "step" in record:
            for b in self.backends:
                b.log(metrics, int(record["step"]))

    def table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        for b in self.backends:
            b.table(name, columns, rows, step)

    def close(self) -> None:
        for b in self.backends:
            b.close()
        self.backends = []
