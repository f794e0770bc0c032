"""Wall-clock phases of a step, honest on CUDA (it synchronizes before each reading)."""

from __future__ import annotations

import time
from typing import Any

import torch


class Timer:
    """Wall-clock phases of a step; synchronizes CUDA before each reading so the split is honest."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.totals: dict[str, float] = {}

    def __call__(self, phase: str) -> Any:
        timer = self

        class _Phase:
            def __enter__(self) -> None:
                if timer.cuda:
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc: Any) -> None:
                if timer.cuda:
                    torch.cuda.synchronize()
                timer.totals[phase] = timer.totals.get(phase, 0.0) + time.perf_counter() - self.t0

        return _Phase()
