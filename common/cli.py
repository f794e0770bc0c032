"""The training CLIs' one body: flags from the config's declarations, checked, then the trainer."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from common.distributed import add_backend_argument
from common.flags import add_flags, config_from_args


def training_parser(config_cls: type, doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, config_cls)
    add_backend_argument(p.add_argument)
    return p


def run_training(config_cls: type, train: Callable[[Any], Any], doc: str | None, argv: list[str] | None) -> None:
    """Parse `argv` into `config_cls` (out-of-range values stop here, before any model loads), set up
    torchrun's process group when there is one, and train."""
    args = training_parser(config_cls, doc).parse_args(argv)
    cfg = config_from_args(config_cls, args)
    from common.distributed import distributed_run

    with distributed_run(cfg.device, args.dist_backend) as (_, device):
        train(dataclasses.replace(cfg, device=device))
