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
    """Make `out` ready for a new run, or check it holds one to resume; one-line errors otherwise, each
    naming `out` (`check_folder`)."""
    check_folder(out, flag)
    has_run = (out / RUN_CONFIG).exists()
    recover_dir(out / CHECKPOINT)
    if resume:
        if not (out / CHECKPOINT).is_dir():
            fail(f"--resume: {out} holds no checkpoint to resume; drop --resume to start a new run")
        if not (out / CHECKPOINT / "trainer_state.json").is_file():
            fail(f"--resume: the checkpoint in {out / CHECKPOINT} lacks trainer_state.json; it is incomplete: "
                 "start a new run (--overwrite)")
        return
    # a run_config.json alone is a run that stopped before its first output (bad data dir, unknown
    # model...): nothing to lose, so the corrected command may reuse the folder
    if out.exists() and any(p.name != RUN_CONFIG for p in out.iterdir()):
        if not overwrite:
            what = "another run" if has_run else "other files"
            fail(f"{flag} {out} already holds {what}; pass --resume to continue it, --overwrite to replace it, "
                 f"or choose another {flag} (from Python: resume=True, overwrite=True or another {flag[2:]})")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"{flag} {out}: cannot create it ({exc.strerror or exc}); choose another {flag}")


def check_folder(out: Path, flag: str) -> None:
    """`out` can hold a run: a folder (or nothing yet) that this user may write in, or one that can be made;
    else one line naming it."""
    if out.exists() and not out.is_dir():
        fail(f"{flag} {out} is a file, not a folder; choose another {flag}")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        fail(f"{flag} {out}: cannot create it ({parent} is a file, not a folder); choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        fail(f"{flag} {out}: {parent} is not writable by this user; choose another {flag} or make it writable")


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
    """`data` as JSON in `path`, atomically: a failed write (disk full) leaves the old file and stops in one line."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        _write_failed(path, exc)


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
            try:
                tmp.write_text("".join(line + "\n" for line in kept))
                os.replace(tmp, path)
            except OSError as exc:
                _write_failed(path, exc)
        try:
            self._file = path.open("a", encoding="utf-8")
        except OSError as exc:
            _write_failed(path, exc)

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
    (peft adapter, or the full state dict as model.safetensors), optimizer, scheduler, step and the RNG
    state of each rank (`rng_states`, in rank order; default: this process's), all in forms that load
    without running code (`load_checkpoint`). Call it on rank 0 only."""
    states = rng_states or [rng_state()]

    def write(tmp: Path) -> None:
        if lora:
            model.save_pretrained(tmp / "adapter")
        else:
            save_tensors(model.state_dict(), tmp / MODEL_WEIGHTS)
        torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch_save({"step": step, "rng": states[0], "rng_per_rank": states}, tmp / "trainer_state.pt")
        write_json(tmp / "trainer_state.json", {"step": step, "total_steps": total_steps,
                                                "world_size": len(states)})

    atomic_dir(out / CHECKPOINT, write)


MODEL_WEIGHTS = "model.safetensors"  # a full fine-tune's weights in its checkpoint (model.pt before)


def torch_save(obj: Any, path: Path) -> None:
    """torch.save through a Python file, so a full disk is an OSError (a path gives a RuntimeError)."""
    import torch

    with path.open("wb") as f:
        torch.save(obj, f)


def save_tensors(state: dict[str, Any], path: Path) -> None:
    """A state dict as safetensors; a tensor shared by several names (tied weights) is stored once, the
    other names kept in the metadata (`load_tensors` restores them)."""
    from safetensors.torch import save

    kept, aliases, first = {}, {}, {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype, tensor.stride())
        if key in first:
            aliases[name] = first[key]
        else:
            first[key], kept[name] = name, tensor.detach().contiguous()
    path.write_bytes(save(kept, metadata={"aliases": json.dumps(aliases)}))


def load_tensors(path: Path, device: str) -> dict[str, Any]:
    """What `save_tensors` wrote, every name back (safetensors runs no code)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = load_file(str(path), device=str(device))
    with safe_open(str(path), "pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    return {**state, **{name: state[first] for name, first in aliases.items()}}


def _safe_globals() -> list[Any]:
    """What torch.load(weights_only=True) may build beyond tensors and plain data: numpy's RNG state (an
    array of uint32; rebuilding an array runs no code of the file's choosing)."""
    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def safe_load(path: Path, device: str | None = None) -> Any:
    """torch.load that never runs code from the file (weights_only, numpy's RNG state allowed); a file
    holding anything else, or not a torch file at all, is one line naming it."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        fail(f"--resume: refusing to load {path}: it holds more than tensors and plain data, or is damaged "
             f"({str(exc).splitlines()[0][:120]}); this trainer never writes such a file, and loading it could run "
             f"someone's code. Start a new run, or resume a checkpoint this trainer wrote")


def load_checkpoint(out: Path, model: Any, optimizer: Any, scheduler: Any, lora: bool, device: str,
                    rank: int = 0, world_size: int = 1) -> int:
    """Restore what `save_checkpoint` wrote (this rank's RNG included); returns the step to continue from.
    The run must resume with the world size that wrote the checkpoint (its data shards and RNG streams).
    Nothing is unpickled beyond tensors and plain data (`safe_load`): a tampered file is one line."""
    from peft import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ckpt = out / CHECKPOINT
    weights = "adapter/adapter_model.safetensors" if lora else (
        MODEL_WEIGHTS if (ckpt / MODEL_WEIGHTS).is_file() or not (ckpt / "model.pt").is_file() else "model.pt")
    missing = [name for name in ("trainer_state.json", weights, "optimizer.pt", "scheduler.pt", "trainer_state.pt")
               if not (ckpt / name).is_file()]
    if missing:  # before anything loads: one line, not a traceback halfway through
        fail(f"--resume: the checkpoint in {ckpt} lacks {', '.join(missing)}; it is incomplete: start a new run "
             "(--overwrite)")
    saved_world = json.loads((ckpt / "trainer_state.json").read_text()).get("world_size", 1)
    if saved_world != world_size:
        fail(f"--resume: the checkpoint in {out} was written by {saved_world} process(es) but this run has "
             f"{world_size}; resume with torchrun --nproc_per_node {saved_world} (x nodes) or start a new run")
    try:
        if lora:
            set_peft_model_state_dict(model, load_file(str(ckpt / "adapter" / "adapter_model.safetensors")))
        elif (ckpt / MODEL_WEIGHTS).is_file():
            model.load_state_dict(load_tensors(ckpt / MODEL_WEIGHTS, device))
        else:  # a checkpoint written before model.safetensors
            model.load_state_dict(safe_load(ckpt / "model.pt", device))
    except (SafetensorError, OSError) as exc:
        fail(f"--resume: cannot read the weights in {ckpt} ({exc}); the checkpoint is damaged: start a new run")
    optimizer.load_state_dict(safe_load(ckpt / "optimizer.pt", device))
    scheduler.load_state_dict(safe_load(ckpt / "scheduler.pt"))
    state = safe_load(ckpt / "trainer_state.pt")
    set_rng_state(state.get("rng_per_rank", [state["rng"]])[rank])
    return state["step"]
