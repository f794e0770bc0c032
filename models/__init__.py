"""Model and tokenizer loading shared by every stage: hub id, local dir, `tiny`, `random:<hub id>`."""

import logging

from models.offline import hub_kernels_off

# before any model loads: no hub kernels in this process (models/offline.py)
hub_kernels_off()

from models.loading import (  # noqa: E402
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

# bitsandbytes warns when its optional CPU kernel is not fetched (hub_kernels_off refuses it); its own
# kernel is used either way.
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
