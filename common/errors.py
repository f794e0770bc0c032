"""One-line errors for bad input, and the CLI wrapper that prints them instead of a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn


class UserError(Exception):
    """Bad input the user can fix; the message names the fix. CLIs print it as one line."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT/SIGTERM after saving its work; the message says where, and how to resume
    (empty on ranks other than 0, so the job says it once)."""


def fail(message: str) -> NoReturn:
    raise UserError(message)


def quiet_off_a_terminal() -> None:
    """Off a terminal (a log file, a pipe, CI), the hub's and transformers' progress bars ("Loading
    weights", "Writing model shards") would fill the log with carriage-return frames: turn them off.
    HF_HUB_DISABLE_PROGRESS_BARS=0 keeps them."""
    if sys.stderr.isatty():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read once, when huggingface_hub is imported
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] != "1":
        return
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def run_cli(main: Callable[[], object]) -> None:
    """Run a CLI entry point; a UserError becomes `error: <message>` on stderr and exit code 2."""
    quiet_off_a_terminal()
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        message = str(exc) if isinstance(exc, Interrupted) else "interrupted"  # empty: another rank says it
        if message:
            print(message, file=sys.stderr)
        sys.exit(130)
