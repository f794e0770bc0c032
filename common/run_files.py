"""Run folders: refuse to clobber another run, write atomically, keep one JSONL line per step.

A crash never leaves a half-written checkpoint or model: everything is written into a temporary
folder beside its target and renamed into place. A resumed run's log is cut back to the checkpoint's
step (lines from steps that will be redone go) and then appended to.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

from common.errors import fail

RUN_CONFIG = "run_config.json"
CHECKPOINT = "checkpoint"


def prepare_output_dir(out: Path, *, resume: bool, overwrite: bool, flag: str) -> None:
    """Make `out` ready for a new run, or check it holds one to resume; one-line errors otherwise."""
    has_run = (out / RUN_CONFIG).exists()
    recover_dir(out / CHECKPOINT)
    if resume:
        if not (out / CHECKPOINT / "trainer_state.json").is_file():
            fail(f"--resume: {out} holds no checkpoint to resume; drop --resume to start a new run")
        return
    # a run_config.json alone is a run that stopped before its first output (bad data dir, unknown
    # model...): nothing to lose, so the corrected command may reuse the folder
    if out.exists() and any(p.name != RUN_CONFIG for p in out.iterdir()):
        if not overwrite:
            what = "another run" if has_run else "other files"
            fail(f"{flag} {out} already holds {what}; pass --resume to continue it, --overwrite to replace it, "
                 f"or choose another {flag} (from Python: resume=True, overwrite=True or another {flag[2:]})")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _old(target: Path) -> Path:
    return target.parent / f".{target.name}.old"


def recover_dir(target: Path) -> None:
    """Undo a crash between `atomic_dir`'s two renames: the previous copy, moved aside as
    .<name>.old, goes back to `target` (the new one never arrived)."""
    old = _old(target)
    if old.is_dir() and not target.exists():
        old.rename(target)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def readable_as_umask_says(root: Path) -> None:
    """Give `root` and everything in it the modes the user's umask gives new files and folders:
    temporary folders are made 0700 and some writers make 0600 files, which a teammate or a serving
    container running as another user could not read."""
    mask = _umask()
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for p in paths:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def _write_failed(target: Path, exc: OSError) -> NoReturn:
    fail(f"cannot write {target} ({exc.strerror or exc}): free some space or make the folder writable; what was "
         f"there before is intact")


def atomic_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a fresh temporary folder, then swap it in for `target` by two renames
    (target -> .<name>.old, tmp -> target). A crash between them is undone by `recover_dir`; a write
    that fails (disk full, no permission) leaves `target` as it was and stops with one line."""
    recover_dir(target)  # never delete the only good copy below
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        _write_failed(target, exc)
    old = _old(target)
    try:
        write(tmp)
        readable_as_umask_says(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        _write_failed(target, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_files_into(target: Path, write: Callable[[Path], None]) -> None:
    """Write files into a temporary folder, then move each into `target`, config.json last.

    For a model saved at the root of a run folder (so `from_pretrained(<run folder>)` loads it): an old
    config.json is removed first, so whenever config.json exists, the files beside it are complete.
    """
    try:
        target.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".model.tmp-", dir=target))
    except OSError as exc:
        _write_failed(target, exc)
    try:
        write(tmp)
        readable_as_umask_says(tmp)
        (target / "config.json").unlink(missing_ok=True)
        names = sorted(p.name for p in tmp.iterdir())
        for name in [n for n in names if n != "config.json"] + [n for n in names if n == "config.json"]:
            os.replace(tmp / name, target / name)
    except OSError as exc:
        _write_failed(target, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def is_measured(field: str) -> bool:
    """Whether a log field is measured (wall times, rates, memory, the timestamp) rather than computed. The
    computed ones are the same, to the bit, when the same command runs again on the same machine
    (tests/test_determinism.py); the measured ones never are."""
    return "time" in field or field.endswith("_per_s") or field.startswith("peak_memory")


class JsonlLog:
    """One JSON line per step, flushed at once; non-finite floats are written as null."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        self._file = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        try:
            self._file.write(json.dumps(clean) + "\n")
            self._file.flush()
        except OSError as exc:
            _write_failed(self.path, exc)

    def close(self) -> None:
        self._file.close()


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a torn last line from a crash: dropped


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_checkpoint(out: Path, model: Any, optimizer: Any, scheduler: Any, step: int, total_steps: int,
                    lora: bool, rng_states: list[dict[str, Any]] | None = None) -> None:
    """Everything `--resume` needs, swapped in atomically as <out>/checkpoint: the trainable weights
    (peft adapter, or the full state dict), optimizer, scheduler, step and the RNG state of each rank
    (`rng_states`, in rank order; default: this process's). Call it on rank 0 only."""
    import torch

    states = rng_states or [rng_state()]

    def write(tmp: Path) -> None:
        if lora:
            model.save_pretrained(tmp / "adapter")
        else:
            torch.save(model.state_dict(), tmp / "model.pt")  # torch.save keeps tied weights tied
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"step": step, "rng": states[0], "rng_per_rank": states}, tmp / "trainer_state.pt")
        write_json(tmp / "trainer_state.json", {"step": step, "total_steps": total_steps,
                                                "world_size": len(states)})

    atomic_dir(out / CHECKPOINT, write)


def load_checkpoint(out: Path, model: Any, optimizer: Any, scheduler: Any, lora: bool, device: str,
                    rank: int = 0, world_size: int = 1) -> int:
    """Restore what `save_checkpoint` wrote (this rank's RNG included); returns the step to continue from.
    The run must resume with the world size that wrote the checkpoint (its data shards and RNG streams)."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    ckpt = out / CHECKPOINT
    saved_world = json.loads((ckpt / "trainer_state.json").read_text()).get("world_size", 1)
    if saved_world != world_size:
        fail(f"--resume: the checkpoint in {out} was written by {saved_world} process(es) but this run has "
             f"{world_size}; resume with torchrun --nproc_per_node {saved_world} (x nodes) or start a new run")
    if lora:
        set_peft_model_state_dict(model, load_file(str(ckpt / "adapter" / "adapter_model.safetensors")))
    else:
        model.load_state_dict(torch.load(ckpt / "model.pt", map_location=device, weights_only=True))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=False))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    set_rng_state(state.get("rng_per_rank", [state["rng"]])[rank])
    return state["step"]
