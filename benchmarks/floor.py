"""The floor of a GRPO step: how long its matrix products alone take on this machine.

A second run of the same steps (same seed, so the same completions) goes under `MatmulCounter`, a
dispatch mode that notes every matrix product (mm, addmm, bmm, baddbmm, scaled-dot-product attention
and its backward) with its shapes, strides and dtype, per step and per phase of `common.timing.Timer`
(generation, reference, backward, ...). Each distinct product is then replayed alone on random
inputs of the same layout and timed: the floor is the sum, over every product the step ran, of its
time alone; the machine's rate at that shape is its FLOPs over that time. Replays go from the most
FLOPs down until 97% of them are timed (at most `max_timed` shapes); the rest are costed at the
timed ones' rate for the same op. What the step spends above the floor is everything else: sampling,
norms, activations, softmax, the optimizer, Python.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from common.timing import Timer

aten = torch.ops.aten
CPU_ATTENTION = aten._scaled_dot_product_flash_attention_for_cpu
CPU_ATTENTION_BACKWARD = aten._scaled_dot_product_flash_attention_for_cpu_backward
PRODUCTS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, CPU_ATTENTION, CPU_ATTENTION_BACKWARD,
            *(p for p in flop_registry if "attention" in str(p))}


def _spec(x: Any) -> Any:
    """A hashable stand-in for an argument: a tensor's layout, or the value itself."""
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.stride(), x.dtype, str(x.device))
    if isinstance(x, (list, tuple)):
        return tuple(_spec(v) for v in x)
    return x


def _build(spec: Any) -> Any:
    """Random inputs for a spec (the same shape, strides, dtype and device)."""
    if isinstance(spec, tuple) and spec and spec[0] == "tensor":
        _, shape, stride, dtype, device = spec
        size = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
        storage = torch.empty(size, dtype=dtype, device=device)  # strides may overlap (expanded inputs)
        storage = storage.normal_() if dtype.is_floating_point else storage.zero_()
        return storage.as_strided(shape, stride)
    if isinstance(spec, tuple):
        return [_build(v) for v in spec]
    return spec


def _flops(func: Any, args: tuple, kwargs: dict, out: Any) -> int:
    packet = func.overloadpacket
    if packet is CPU_ATTENTION:
        return sdpa_flop_count(args[0].shape, args[1].shape, args[2].shape)
    if packet is CPU_ATTENTION_BACKWARD:
        return sdpa_backward_flop_count(args[0].shape, args[1].shape, args[2].shape, args[3].shape)
    return int(flop_registry[packet](*args, **kwargs, out_val=out))


class MatmulCounter(TorchDispatchMode):
    """Counts each matrix product by (step, phase, signature); `phase` and `step` are set from outside
    (`tagged_phases`). Products outside a phase (evaluation) are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.phase: str | None = None
        self.step = 0
        self.counts: Counter = Counter()
        self.flops: dict[tuple, int] = {}  # signature -> FLOPs of one call

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.phase is not None and func.overloadpacket in PRODUCTS:
            signature = (func, _spec(args), _spec(tuple(sorted(kwargs.items()))))
            if signature not in self.flops:
                self.flops[signature] = _flops(func, args, kwargs, out)
            self.counts[(self.step, self.phase, signature)] += 1
        return out


@contextlib.contextmanager
def tagged_phases(counter: MatmulCounter) -> Iterator[None]:
    """Count under `counter`, told the phase by `common.timing.Timer` (a step ends with its optimizer phase)."""
    original = Timer.__call__

    def call(timer: Timer, phase: str) -> Any:
        inner = original(timer, phase)

        class Tagged:
            def __enter__(self) -> None:
                counter.phase = phase
                inner.__enter__()

            def __exit__(self, *exc: Any) -> None:
                inner.__exit__(*exc)
                counter.phase = None
                counter.step += phase == "optimizer"

        return Tagged()

    Timer.__call__ = call
    try:
        with counter:
            yield
    finally:
        Timer.__call__ = original


def replay_seconds(signature: tuple, min_time: float = 0.05) -> float:
    """Median time of one call of this product alone (after a warm-up), on random inputs."""
    func, args, kwargs = signature
    args, kwargs = _build(args), dict(_build(kwargs))
    sync = torch.cuda.synchronize if any("cuda" in str(a) for a in signature[1]) else (lambda: None)
    func(*args, **kwargs)
    times: list[float] = []
    while len(times) < 3 or (sum(times) < min_time and len(times) < 50):
        sync()
        t0 = time.perf_counter()
        func(*args, **kwargs)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def floor(counter: MatmulCounter, steps: range, coverage: float = 0.97, max_timed: int = 80) -> dict[str, Any]:
    """Per phase, per step (averaged over `steps`): matrix-product GFLOP and floor seconds; and the
    rate measured at the shapes that carry the most FLOPs."""
    per_sig: Counter = Counter()
    for (step, _, sig), n in counter.counts.items():
        if step in steps:
            per_sig[sig] += n * counter.flops[sig]
    total = sum(per_sig.values()) or 1
    seconds: dict[tuple, float] = {}
    done = 0
    for sig, flops in per_sig.most_common():
        if done >= coverage * total or len(seconds) >= max_timed:
            break
        seconds[sig] = replay_seconds(sig)
        done += flops
    rate: dict[Any, float] = {}  # FLOP/s per op over the timed shapes, for the untimed rest
    for op in {sig[0].overloadpacket for sig in seconds}:
        timed = [s for s in seconds if s[0].overloadpacket is op]
        rate[op] = sum(counter.flops[s] for s in timed) / max(sum(seconds[s] for s in timed), 1e-12)
    overall = sum(counter.flops[s] for s in seconds) / max(sum(seconds.values()), 1e-12)

    def one_call(sig: tuple) -> float:
        if sig in seconds:
            return seconds[sig]
        return counter.flops[sig] / rate.get(sig[0].overloadpacket, overall)

    phases: dict[str, dict[str, float]] = {}
    for (step, phase, sig), n in counter.counts.items():
        if step in steps:
            p = phases.setdefault(phase, {"gflop": 0.0, "floor_s": 0.0})
            p["gflop"] += n * counter.flops[sig] / 1e9 / len(steps)
            p["floor_s"] += n * one_call(sig) / len(steps)
    top = [{"op": str(sig[0].overloadpacket).removeprefix("aten."),
            "shapes": [list(a[1]) for a in sig[1] if isinstance(a, tuple) and a and a[0] == "tensor"],
            "share_of_flops": round(flops / total, 3),
            "gflop_per_s": round(counter.flops[sig] / seconds[sig] / 1e9, 1)}
           for sig, flops in per_sig.most_common(5) if sig in seconds]
    return {"phases": phases, "timed_share_of_flops": round(done / total, 3), "timed_shapes": len(seconds),
            "top_shapes": top}
