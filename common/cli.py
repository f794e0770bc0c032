"""The training CLIs' one body: flags from the config's declarations, checked, then the trainer."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from common.distributed import add_backend_argument, distributed_run
from common.flags import parse_flags


def run_training(config_cls: type, train: Callable[[Any], Any], doc: str | None, argv: list[str] | None) -> None:
    """Parse `argv` into `config_cls` (out-of-range values stop here, before any model loads), set up
    torchrun's process group when there is one, and train."""
    cfg, args = parse_flags(config_cls, argv, doc, extra=lambda p: add_backend_argument(p.add_argument))
    with distributed_run(cfg.device, args.dist_backend) as (_, device):
        train(dataclasses.replace(cfg, device=device))
