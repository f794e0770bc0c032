"""Shared fixtures. HF_HUB_OFFLINE is set before any Hugging Face import: tests never touch the hub."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


def gsm8k_dir() -> str | None:
    path = os.environ.get("GSM8K_DIR")
    return path if path and (Path(path) / "test.jsonl").is_file() else None


needs_gsm8k = pytest.mark.skipif(
    gsm8k_dir() is None, reason="GSM8K not present: set GSM8K_DIR to a folder with train.jsonl and test.jsonl"
)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from models import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    """A fresh tiny model per test (loading from the disk cache takes a fraction of a second)."""
    from models import load_model

    return load_model("tiny", device="cpu", tokenizer=tiny_tokenizer)
