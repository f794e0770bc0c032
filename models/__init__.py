"""Model and tokenizer loading shared by every stage: hub id, local dir, `tiny`, `random:<hub id>`."""

import logging

from models.loading import (
    TINY,
    autocast,
    default_device,
    default_dtype,
    frozen_copy,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    require_4bit,
)

# bitsandbytes tries to fetch an optional CPU kernel from the hub when imported (peft imports it) and
# warns when that fails offline; its own fallback kernel is used either way.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__all__ = [
    "TINY",
    "autocast",
    "default_device",
    "default_dtype",
    "frozen_copy",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "require_4bit",
]
