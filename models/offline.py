"""Offline by construction: once a model and its data are on disk, no load reaches for the network and
no module is swapped behind our back.

- `hub_kernels_off()` runs when `models` is imported, before anything loads. transformers 5.25 with the
  `kernels` package (one of its requirements) loads every model with `use_kernels=True`, and each
  `model.train()` / `model.eval()` then fetches RMSNorm/RoPE kernels for the model's device from the hub:
  offline that raises ("Version 2 of 'kernels-community/rotary' is not available in the local cache"),
  online it trains a model whose norms and rotary are not the ones our tests checked.
- `cached_first(load, source)`: a hub id is looked up in the local cache first; the network is asked
  only when the cache lacks it (the first run of a hub model downloads it, later runs never connect).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

# transformers reads it at each load: from_pretrained(use_kernels=None) -> False, and its lazy kernel
# look-ups (fp8, MoE) take the local packages only. Set, not defaulted: a USE_HUB_KERNELS=YES left in a
# shell must not bring the hub back.
KERNELS_ENV = {"USE_HUB_KERNELS": "NO"}


class HubKernelsOff(RuntimeError):
    """What `kernels.get_kernel` raises in this process: hub kernels are off by design."""


def _refuse_hub_kernel(repo_id: str, *args: Any, **kwargs: Any) -> Any:
    raise HubKernelsOff(f"hub kernel {repo_id} not fetched: qwen-gsm8k-grpo runs the model's own modules")


def hub_kernels_off() -> None:
    """Turn hub kernels off for this process (idempotent; cheap once transformers is imported)."""
    os.environ.update(KERNELS_ENV)
    try:
        import kernels
    except ImportError:  # transformers 5.24 and older do not require it
        return
    # bitsandbytes (imported by peft) calls kernels.get_kernel when imported on CPUs with AVX512-BF16, for
    # an inference-only 4-bit kernel we never use (models.loading.keep_4bit_trainable); it catches any
    # error and keeps its own kernel. Every other caller is transformers, which the variable above stops.
    kernels.get_kernel = _refuse_hub_kernel


def cached_first(load: Callable[..., Any], source: str, **kwargs: Any) -> Any:
    """`load(source, **kwargs)` for a local folder; for a hub id, the cached copy first
    (`local_files_only=True`) and the hub only when the cache lacks it (OSError)."""
    if Path(source).is_dir():
        return load(source, **kwargs)
    try:
        return load(source, local_files_only=True, **kwargs)
    except OSError:
        return load(source, **kwargs)
