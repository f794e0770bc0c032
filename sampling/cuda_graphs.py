"""The decode step replayed from CUDA graphs: one kernel-launch sequence per step instead of hundreds
of Python-issued launches, which is what a 0.6B model's decode step costs on a GPU.

A graph freezes shapes and addresses, so the step reads its inputs from fixed tensors (token, position,
cache slot) and attends over a fixed number of cache slots: the slots in use rounded up to `bucket`
(later slots are masked). One graph per width, captured the first time a width is reached, all in one
memory pool. The KV cache buffers must stay the same tensors for the graphs' life (no dropped rows).

`DecodeGraphs` keeps one decode state (weight copies, KV cache) and its graphs across rollouts: a GRPO
run captures each width once, not once per step, and refreshes the weights in place before each rollout,
as long as that state fits beside the backward (`before_backward`, `measured`); otherwise it is freed
before each backward and captured again at the next rollout. A `Sampler` built with `cuda_graphs=True`
owns one. Graphs are the CUDA default (`--cuda_graphs auto`); `python -m benchmarks.launches` counts
the launches a graph saves.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch

from common.distributed import default_device
from common.errors import fail
from sampling.fast_decode import DecodeState, _base

BUCKET = 128  # attention width granularity: fewer graphs against less attention over masked slots
FITS = 0.9  # the graphed state stays through backward passes while a step's peak with it is under this share


def use_cuda_graphs(choice: str | bool, device: str) -> bool:
    """--cuda_graphs as a yes or no on `device`: auto is yes on CUDA; on off CUDA is a one-line error."""
    cuda = str(device).startswith("cuda")
    if choice is True or choice == "on":
        if not cuda:
            fail(f"--cuda_graphs on needs a CUDA device, not {device}: use --cuda_graphs auto or --device cuda")
        return True
    return cuda and choice == "auto"


def graphs_without_cuda(cfg: Any) -> str | None:
    """The rule (common/flags.py) of every --cuda_graphs flag beside a --device one: `on` needs the
    device, or the default one, to be CUDA."""
    device = cfg.device or default_device()
    if cfg.cuda_graphs == "on" and not str(device).startswith("cuda"):
        return f"--cuda_graphs on needs a CUDA device, not {device}: use --cuda_graphs auto or --device cuda"
    return None


class CapturedStep:
    """What `capture` returns: `replay()` reruns the recorded kernels; `output` is where they write."""

    def __init__(self, graph: Any, output: torch.Tensor):
        self.graph, self.output = graph, output

    def replay(self) -> None:
        self.graph.replay()


def capture(fn: Callable[[], torch.Tensor], pool: Any) -> tuple[CapturedStep, Any]:
    """Record `fn` (no arguments: it reads only fixed tensors) as a CUDA graph in memory pool `pool`.

    One eager run first, on a side stream as PyTorch asks, so lazy allocations and library handles
    are made outside the capture; the decode step it runs writes the same cache slot the replay will."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    # the step fixes its own dtypes; autocast's cast cache must stay out of a capture
    with torch.autocast("cuda", enabled=False):
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            output = fn()
    return CapturedStep(graph, output), graph.pool()


class GraphedDecodeStep:
    """`step(token, position, slot_index)` through CUDA graphs.

    `step_fn(token, position, slot, width)` is the decode step (`DecodeState.step`); `slots` is the
    cache length. Nothing here refers back to the rollout that uses it, so a rollout's decoder is freed
    as soon as the rollout returns (no reference cycle waiting for Python's cyclic collector)."""

    def __init__(self, step_fn: Callable[..., torch.Tensor], batch: int, slots: int, device: torch.device):
        self.step_fn, self.slots, self.bucket = step_fn, slots, BUCKET
        self.token = torch.zeros(batch, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs: dict[int, CapturedStep] = {}
        self.pool = None

    def width(self, slot: int) -> int:
        return min(-(-(slot + 1) // self.bucket) * self.bucket, self.slots)

    def __call__(self, token: torch.Tensor, position: torch.Tensor, slot: int) -> torch.Tensor:
        self.token.copy_(token)
        self.position.copy_(position)
        self.slot.fill_(slot)
        width = self.width(slot)
        if width not in self.graphs:
            step_fn, inputs = self.step_fn, (self.token, self.position, self.slot)
            self.graphs[width], self.pool = capture(lambda: step_fn(*inputs, width), self.pool)
        graph = self.graphs[width]
        graph.replay()
        return graph.output  # overwritten by the next replay: read it before the next step


class DecodeGraphs:
    """One decode state and its CUDA graphs, kept across rollouts (a `Sampler`'s, with `cuda_graphs=True`).

    A rollout of the same model, dtype and rows that needs at most the state's cache slots reuses it:
    weights refreshed in place (training updates and LoRA merges follow), the cache refilled, every
    graph already captured replayed as it is. Otherwise the old state is dropped and a new one, with
    room for at least as many slots as before, is built. `release()` frees the state's memory (bf16
    weight copies, the KV cache, the graph pool).

    A trainer calls `before_backward()` before each backward phase, which frees the state unless it has
    been measured to fit (`measured`), and `measured()` after each step. A step measured with shorter
    completions than the longest allowed says nothing about the longest, so only a step that reached
    --max_completion_length can show that it fits (docs/training.md has the sizes)."""

    def __init__(self) -> None:
        self.state: DecodeState | None = None
        self.graphed: GraphedDecodeStep | None = None
        self._model: Any = None
        self.builds = 0
        self.keep = False  # hold the state through backward passes: set once measured to fit
        self.state_bytes = 0  # what the last state built holds (weights and cache; the graph pool is small)
        self.failed: str | None = None  # why a capture failed: the run decodes eagerly from then on

    def prepare(self, model: Any, dtype: torch.dtype, rows: int, slots: int,
                device: torch.device) -> tuple[DecodeState, GraphedDecodeStep]:
        base = _base(model)
        same = (self.state is not None and self._model() is base and self.state.dtype == dtype
                and self.state.rows == rows)
        if same and slots <= self.state.slots:
            self.state.weights.load(model)
        else:
            room = max(slots, self.state.slots if same else 0)
            room = -(-room // BUCKET) * BUCKET  # whole graph widths, so a slightly longer prompt fits later
            self.release()  # before allocating the new one: never two states at once
            self.state = DecodeState(model, dtype, rows, room, device)
            self.graphed = GraphedDecodeStep(self.state.step, rows, room, device)
            self._model = weakref.ref(base)
            self.builds += 1
            self.state_bytes = self.state.nbytes()
        return self.state, self.graphed

    def release(self) -> None:
        self.state = self.graphed = None

    def give_up(self, error: Exception) -> None:
        """A capture failed (a torch build or GPU that refuses it): say so once; eager from now on. The
        run goes on with the same samples, only slower: graphs are the default, not a requirement."""
        self.failed = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        print(f"warning: CUDA graph capture failed ({self.failed}); decoding eagerly from now on "
              "(--cuda_graphs off skips the attempt)", file=sys.stderr, flush=True)
        self.release()

    def before_backward(self) -> None:
        """Free the state before a backward phase unless it has been measured to fit beside one."""
        if not self.keep:
            self.release()

    def measured(self, peak_bytes: int, total_bytes: int, longest: bool) -> None:
        """After a step: its peak allocated bytes on a device of `total_bytes`; `longest`: a completion
        reached the longest length allowed (the widest backward). A kept state goes back to being freed
        when a step peaked above FITS of the device; a freed one is kept from the next step on when
        the step reached the longest length and its peak plus the state stays under FITS."""
        room = FITS * total_bytes
        if self.keep:
            self.keep = peak_bytes <= room
        else:
            self.keep = longest and peak_bytes + self.state_bytes <= room
