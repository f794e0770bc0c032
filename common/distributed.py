"""Data parallelism with torchrun: one process per device, PyTorch's own process group and DDP.

    torchrun --standalone --nproc_per_node 2 train_grpo.py ...   (or train_sft.py, -m eval)

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `distributed_run` reads them, starts the process group
(nccl on CUDA, gloo on the CPU), gives each local rank its own GPU and tears the group down at the end.
A plain `python train_grpo.py` has no WORLD_SIZE: it gets `Dist()` (one process), starts nothing and
every helper below returns its input, so single-process runs pay nothing.

Library code asks `current()` for the rank and world size; only the CLIs start and stop the group.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from common.errors import UserError, fail

BACKENDS = ("auto", "nccl", "gloo")
T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job. The default is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: Any, op: str = "sum") -> Any:
        """Sum (or max/min) of a tensor over ranks, in place and returned; a no-op for one process."""
        if self.enabled:
            import torch.distributed as td

            td.all_reduce(x, op={"sum": td.ReduceOp.SUM, "max": td.ReduceOp.MAX, "min": td.ReduceOp.MIN}[op])
        return x

    def all_gather(self, x: Any) -> Any:
        """Concatenate equal-shaped tensors of all ranks along dim 0, in rank order."""
        if not self.enabled:
            return x
        import torch
        import torch.distributed as td

        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        td.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def gather_objects(self, obj: T) -> list[T]:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        import torch.distributed as td

        out: list[Any] = [None] * self.world_size
        td.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as td

            td.barrier()

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run `fn` on rank 0 only; a UserError there is raised on every rank (one line each, no hang)."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except UserError as exc:
                error = str(exc)
        if self.enabled:
            error = self.gather_objects(error)[0]
        if error is not None:
            raise UserError(error)
        return result


def add_backend_argument(add: Callable[..., Any]) -> None:
    """The `--dist_backend` option every torchrun-aware CLI shares; `add` is a parser's add_argument."""
    add("--dist_backend", default="auto", choices=list(BACKENDS),
        help="under torchrun: process-group backend (auto: nccl on GPUs, gloo on CPU)")


def check_4bit(use_4bit: bool, dist: Dist, device: str) -> None:
    """4-bit bases under DDP only on CUDA: bitsandbytes' CPU 4-bit is not combined with DDP here."""
    if use_4bit and dist.enabled and not device.startswith("cuda"):
        fail("--use_4bit with several processes needs CUDA (bitsandbytes' CPU 4-bit is not combined with "
             "DDP here); drop --use_4bit or run single-process")


def current() -> Dist:
    """The running job's Dist: from the process group when torchrun started one, else one process."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        return Dist(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return Dist()


def default_device() -> str:
    """cuda when a GPU is visible, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _pick_device_and_backend(device: str | None, backend: str, local_rank: int) -> tuple[str, str]:
    import torch

    if backend not in BACKENDS:
        fail(f"--dist_backend must be one of {', '.join(BACKENDS)}")
    wants_cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    if wants_cuda:
        count = torch.cuda.device_count()
        if count == 0:
            fail(f"--device {device} but no CUDA GPU is visible; use --device cpu (gloo) or run on GPUs")
        if local_rank >= count:
            fail(f"torchrun started local rank {local_rank} but this node has {count} GPU(s); "
                 f"use --nproc_per_node {count} or fewer")
        device = f"cuda:{local_rank}"
    else:
        device = "cpu"
        if backend == "nccl":
            fail("--dist_backend nccl needs CUDA GPUs; use --dist_backend gloo (or auto) for CPU processes")
    if backend == "auto":
        backend = "nccl" if wants_cuda else "gloo"
    return device, backend


@contextmanager
def distributed_run(device: str | None = None, backend: str = "auto") -> Iterator[tuple[Dist, str]]:
    """(Dist, device) for this process: under torchrun, start the process group, one device per local
    rank, and destroy the group on the way out; otherwise (Dist(), device or the default device)."""
    if not launched_by_torchrun():
        device = device or default_device()
        if device.startswith("cuda:"):  # graph capture, synchronize and peak memory act on the current device
            import torch

            torch.cuda.set_device(device)
        yield Dist(), device
        return
    import torch
    import torch.distributed as td

    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device, backend = _pick_device_and_backend(device, backend, local)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    td.init_process_group(backend=backend, rank=rank, world_size=world)
    try:
        yield Dist(rank, world, local), device
        # every rank done with every collective before any tears its connections down: a rank leaving
        # early can abort at exit (gloo: "terminate called without an active exception")
        td.barrier()
    finally:
        td.destroy_process_group()


def wrap_ddp(model: Any, dist: Dist, device: str) -> Any:
    """`model` wrapped in DistributedDataParallel (gradients averaged over ranks), or itself alone.

    Rank 0's weights are broadcast to all ranks here, so every rank starts from the same model.
    """
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [int(device.split(":")[1])] if device.startswith("cuda") else None
    # gradients as views into DDP's all-reduce buckets (no second copy of them); no buffers to broadcast
    # each forward (rotary frequencies are the same on every rank)
    return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True, broadcast_buffers=False)


def no_sync_unless(ddp_model: Any, sync: bool) -> Any:
    """Context for one micro-batch: skip DDP's gradient all-reduce unless `sync` (the last micro-batch)."""
    from contextlib import nullcontext

    return nullcontext() if sync or not hasattr(ddp_model, "no_sync") else ddp_model.no_sync()
