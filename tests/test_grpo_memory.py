"""The memory ledger's fit check (grpo/memory.py), made on CUDA before a run's model loads: the CPU
tests the mechanism on the tiny shape with the free memory given."""

from __future__ import annotations

import dataclasses

import pytest

from common.errors import UserError
from grpo.memory import FIT_SHARE, GB, LedgerSettings, alternatives, check_fit, ledger

SMALL = LedgerSettings(model="tiny", prompt_tokens=8, completion_tokens=8, micro_batch_size=2)


def test_a_run_that_fits_passes_and_returns_its_peak():
    peak = ledger(SMALL)["peak"]
    assert check_fit(SMALL, "cpu", free=int(peak * GB / FIT_SHARE * 1.01)) == pytest.approx(peak)


def test_a_run_that_does_not_fit_stops_in_one_line_naming_what_fits_with_peaks():
    peak = ledger(SMALL)["peak"]
    options = {flags: ledger(alt)["peak"] for flags, alt in alternatives(SMALL)}
    # room for the best alternative but not for the run as configured
    room_gb = (min(options.values()) + peak) / 2
    fitting = {f for f, p in options.items() if p <= room_gb}
    assert fitting and peak > room_gb
    with pytest.raises(UserError) as err:
        check_fit(SMALL, "cpu", free=int(room_gb * GB / FIT_SHARE))
    message = str(err.value)
    assert "\n" not in message and f"about {peak:.2g} GB" in message and "--no_fit_check" in message
    named = message.split("settings that fit: ")[1].split("; or --no_fit_check")[0].split(", ")
    assert sorted(x.rsplit(" (", 1)[0] for x in named) == sorted(fitting)


def test_nothing_fits_names_the_smallest():
    with pytest.raises(UserError, match="nothing tried fits; the smallest is"):
        check_fit(SMALL, "cpu", free=1)


def test_alternatives_cover_checkpointing_lora_4bit_and_micro_batches():
    flags = [f for f, _ in alternatives(SMALL)]
    assert flags[:5] == ["--gradient_checkpointing", "--finetune lora", "--finetune lora --gradient_checkpointing",
                         "--finetune lora --use_4bit", "--finetune lora --use_4bit --gradient_checkpointing"]
    assert flags[5:] == ["--micro_batch_size 1"]
    done = dataclasses.replace(SMALL, finetune="lora", use_4bit=True, gradient_checkpointing=True, micro_batch_size=1)
    assert alternatives(done) == []


def test_the_ledger_counts_a_4bit_base():
    """NF4 weights: ~0.52 bytes per linear weight (the embedding and norms stay bf16); no decode copies
    (a 4-bit model decodes through its own forward); the adapters train as under plain LoRA."""
    lora = ledger(dataclasses.replace(SMALL, finetune="lora"))
    nf4 = ledger(dataclasses.replace(SMALL, finetune="lora", use_4bit=True))
    assert nf4["weights"] < lora["weights"] and nf4["decode_weights"] == 0.0 < lora["decode_weights"]
    assert nf4["gradients"] == lora["gradients"] and nf4["saved_activations"] == lora["saved_activations"]


def test_grpo_run_settings_take_its_longest_prompt(tiny_tokenizer):
    from data import load_records
    from data.prompt import DEFAULT_FORMAT, encode_prompt
    from grpo.config import GRPOConfig
    from grpo.trainer import ledger_settings

    records = load_records("synthetic", "train", max_samples=20)
    cfg = GRPOConfig(model_name="tiny", micro_batch_size=2, max_completion_length=64, finetune="lora")
    s = ledger_settings(cfg, "tiny", DEFAULT_FORMAT, records)
    longest = max(len(encode_prompt(tiny_tokenizer, r["question"])) for r in records)
    assert (s.prompt_tokens, s.completion_tokens, s.micro_batch_size, s.finetune) == (longest, 64, 2, "lora")
