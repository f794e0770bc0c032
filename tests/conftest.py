"""Shared fixtures. HF_HUB_OFFLINE is set before any Hugging Face import: tests never touch the hub."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent

import pytest  # noqa: E402


def load_dev(name: str) -> ModuleType:
    """dev/<name>.py as a module: dev/ holds one-off studies run by path, not an installed package."""
    module_name = f"dev_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, ROOT / "dev" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        # registered before it runs: its dataclasses resolve their annotations through sys.modules
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


@contextlib.contextmanager
def crash_at_checkpoint(monkeypatch: pytest.MonkeyPatch, step: int) -> Iterator[None]:
    """The run inside must crash in step `step`'s checkpoint (Run.checkpoint raises there); after it the real
    checkpoint is back, for the same run's --resume."""
    from training.run import Run

    real = Run.checkpoint

    def crash(self, at, *args, **kwargs):
        if at == step:
            raise RuntimeError("crash")
        return real(self, at, *args, **kwargs)

    monkeypatch.setattr(Run, "checkpoint", crash)
    with pytest.raises(RuntimeError, match="crash"):
        yield
    monkeypatch.setattr(Run, "checkpoint", real)


def gsm8k_dir() -> str | None:
    path = os.environ.get("GSM8K_DIR")
    return path if path and (Path(path) / "test.jsonl").is_file() else None


needs_gsm8k = pytest.mark.skipif(
    gsm8k_dir() is None, reason="GSM8K not present: set GSM8K_DIR to a folder with train.jsonl and test.jsonl"
)


def give_lora_b_weights(model, std: float) -> None:
    """peft starts every lora_B at zero (a no-op adapter); draw it from N(0, std) as a trained adapter
    would have it, so merging, disabling and gradients through the adapter all show."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from models import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    """A fresh tiny model per test (loading from the disk cache takes a fraction of a second)."""
    from models import load_model

    return load_model("tiny", device="cpu", tokenizer=tiny_tokenizer)


SEEN_KINDS = "synthetic:add,sub,mul,div,mul_sub,wage"  # the demo's: SFT's worked solutions cover these
NEW_KIND = "synthetic:times_more"  # ...and not this one: GRPO learns it from final answers alone


@pytest.fixture(scope="session")
def sft_tiny(tmp_path_factory):
    """One SFT of the tiny model on worked solutions of six kinds of problem (the demo's SFT; ~3.5 min on
    2 cores), shared by the learning tests (`-m slow`).

    Full fine-tuning, 400 steps of 64 at a constant lr 1e-3; a cosine-annealed SFT leaves a sharper,
    weaker model that GRPO barely moves. Held-out eval at step 0 and at the end, on the seen kinds:
    0.637-0.677 over seeds 0-3 (one thread), format rate >= 0.997.
    """
    from sft.trainer import SFTConfig, train_sft

    out = tmp_path_factory.mktemp("sft_tiny")
    cfg = SFTConfig(model_name="tiny", dataset=SEEN_KINDS, sft_output=str(out), finetune="full", max_steps=400,
                    num_epochs=10, batch_size=64, learning_rate=1e-3, lr_decay="constant", warmup_ratio=0.0,
                    eval_every=10_000, eval_samples=100, eval_max_new_tokens=48, save_every=10_000, device="cpu",
                    show_progress=False, seed=0)
    summary = train_sft(cfg)
    return out, summary
