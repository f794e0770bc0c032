"""Model and tokenizer loading shared by every stage: hub id, local dir, `tiny`, `random:<hub id>`."""

from models.loading import (
    TINY,
    default_device,
    default_dtype,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    require_4bit,
)

__all__ = [
    "TINY",
    "default_device",
    "default_dtype",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "require_4bit",
]
