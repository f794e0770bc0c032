import json
import subprocess
import sys

import pytest
import torch

from common.errors import UserError
from data import make_synthetic
from data.prompt import encode_prompt
from models.lora import add_lora
from sft.batching import collate, completion_loss_sum, encode_records
from sft.trainer import LOG_NAME, SFTConfig, train_sft
from tests.conftest import ROOT


def quick_config(out, **overrides) -> SFTConfig:
    base = dict(model_name="tiny", dataset="synthetic", sft_output=str(out), max_samples=64, batch_size=8,
                num_epochs=1, learning_rate=3e-3, eval_samples=8, eval_max_new_tokens=16, device="cpu",
                show_progress=False, seed=3)
    base.update(overrides)
    return SFTConfig(**base)


def test_collate_masks_padding_and_keeps_eos_when_pad_is_eos(tiny_tokenizer):
    records = make_synthetic("train", max_samples=3)
    examples, skipped = encode_records(tiny_tokenizer, records, max_length=512)
    assert skipped == 0
    eos = tiny_tokenizer.eos_token_id
    batch = collate(examples, pad_id=eos)  # the pad == eos case of many chat models
    for row, (ids, _) in enumerate(examples):
        prompt_len = len(encode_prompt(tiny_tokenizer, records[row]["question"]))
        assert (batch["labels"][row, :prompt_len] == -100).all()
        assert batch["labels"][row, len(ids) - 1] == eos  # end-of-turn is a target despite pad == eos
        assert (batch["labels"][row, len(ids):] == -100).all()
        assert batch["attention_mask"][row].sum() == len(ids)


def test_target_position_loss_equals_the_full_logits_loss(tiny_model, tiny_tokenizer, monkeypatch):
    """The loss through target positions only, projected onto the vocabulary inside the loss, gives the
    full-logits cross-entropy's value and gradients, prompts of different lengths and pad == eos
    included: the model's head never runs, and only the target columns' hidden states are projected."""
    import models.logprobs
    from sft.batching import completion_loss_sum_full

    records = make_synthetic("train", max_samples=6, seed=5)
    batch = collate(encode_records(tiny_tokenizer, records, 512)[0], tiny_tokenizer.eos_token_id)
    kept = []
    head = tiny_model.lm_head
    hook = head.register_forward_hook(lambda m, i, o: kept.append(o.shape[1]))
    projected = models.logprobs.projected_logprobs
    monkeypatch.setattr(models.logprobs, "projected_logprobs", lambda hidden, *a, **k:
                        kept.append(("projected", hidden.shape[1])) or projected(hidden, *a, **k))
    results = []
    for fn in (completion_loss_sum, completion_loss_sum_full):
        tiny_model.zero_grad()
        loss = fn(tiny_model, batch)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in tiny_model.named_parameters()}))
    hook.remove()
    (chunked, g_chunked), (full, g_full) = results
    assert chunked == pytest.approx(full, rel=1e-5)
    assert all(torch.allclose(g_chunked[n], g_full[n], atol=1e-5 * g_full[n].abs().max(), rtol=0) for n in g_full)
    prompt_min = min(len(encode_prompt(tiny_tokenizer, r["question"])) for r in records)
    assert kept == [("projected", batch["input_ids"].shape[1] - prompt_min), batch["input_ids"].shape[1]]


def test_loss_falls_lora_changes_base_does_not(tiny_model, tiny_tokenizer):
    model = add_lora(tiny_model, r=8, alpha=16, dropout=0.0)
    base_before = {k: v.clone() for k, v in model.named_parameters() if "lora_" not in k}
    lora_before = {k: v.clone() for k, v in model.named_parameters() if "lora_" in k}
    batch = collate(encode_records(tiny_tokenizer, make_synthetic("train", max_samples=4), 512)[0],
                    tiny_tokenizer.pad_token_id)
    n_target = int((batch["labels"][:, 1:] != -100).sum())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(30):
        loss = completion_loss_sum(model, batch) / n_target
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses
    after = dict(model.named_parameters())
    assert all(torch.equal(v, after[k]) for k, v in base_before.items())
    assert any(not torch.equal(v, after[k]) for k, v in lora_before.items() if "lora_B" in k)


def test_sft_output_reloads_with_same_logits(tmp_path, tiny_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from models import load_model

    out = tmp_path / "sft"
    train_sft(quick_config(out, max_steps=3))
    merged = AutoModelForCausalLM.from_pretrained(out)
    trained = PeftModel.from_pretrained(load_model("tiny", device="cpu"), out / "adapter")
    ids = torch.tensor([encode_prompt(tiny_tokenizer, "Ann has 3 pens. How many pens does Ann have?")])
    merged.eval()
    trained.eval()
    with torch.no_grad():
        a, b = merged(ids).logits, trained(ids).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert not torch.allclose(a, load_model("tiny", device="cpu")(ids).logits, atol=1e-4)  # it did train
    lines = [json.loads(x) for x in (out / LOG_NAME).read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    for key in ("timestamp_iso", "epoch", "loss", "learning_rate", "grad_norm", "tokens", "tokens_per_s",
                "time_per_step_s"):
        assert key in lines[0], key
    assert "eval_accuracy" in lines[-1] and "eval_format_rate" in lines[-1]
    assert (out / "eval" / "eval_summary.json").is_file()


def test_refuses_to_overwrite_another_run(tmp_path):
    out = tmp_path / "sft"
    train_sft(quick_config(out, max_steps=1))
    with pytest.raises(UserError, match="--overwrite"):
        train_sft(quick_config(out, max_steps=1))
    with pytest.raises(UserError, match="no checkpoint"):
        train_sft(quick_config(tmp_path / "empty", max_steps=1, resume=True))
    train_sft(quick_config(out, max_steps=1, overwrite=True))


def test_a_run_that_stopped_before_any_output_does_not_block_the_next(tmp_path):
    out = tmp_path / "sft"
    with pytest.raises(UserError, match="data"):
        train_sft(quick_config(out, dataset="gsm8k", data_dir=str(tmp_path / "missing")))
    assert not out.exists()  # the folder is prepared only once the data loads
    train_sft(quick_config(out, max_steps=1))  # the corrected command, same folder, no --overwrite
    with pytest.raises(UserError, match="--overwrite"):  # now it holds a run
        train_sft(quick_config(out, max_steps=1))


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_resume_matches_uninterrupted(tmp_path, monkeypatch, finetune):
    common = dict(max_steps=6, save_every=3, lora_dropout=0.1, finetune=finetune)
    train_sft(quick_config(tmp_path / "straight", **common))

    import common.run_files as runs

    real_write = runs.JsonlLog.write

    def crash_at_step_5(self, record):
        if record.get("step") == 5:
            raise KeyboardInterrupt  # killed after step 4 was logged; the checkpoint holds step 3
        real_write(self, record)

    monkeypatch.setattr(runs.JsonlLog, "write", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_sft(quick_config(tmp_path / "resumed", **common))
    monkeypatch.setattr(runs.JsonlLog, "write", real_write)
    train_sft(quick_config(tmp_path / "resumed", resume=True, **common))

    straight = [json.loads(x) for x in (tmp_path / "straight" / LOG_NAME).read_text().splitlines()]
    resumed = [json.loads(x) for x in (tmp_path / "resumed" / LOG_NAME).read_text().splitlines()]
    assert [x["step"] for x in resumed] == [1, 2, 3, 4, 5, 6]  # step 4 redone, not duplicated
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)


def test_qlora_4bit_trains_on_cpu(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "qlora"
    train_sft(quick_config(out, max_steps=2, use_4bit=True, batch_size=4))
    lines = [json.loads(x) for x in (out / LOG_NAME).read_text().splitlines()]
    assert len(lines) == 2 and all(x["grad_norm"] > 0 for x in lines)
    merged = AutoModelForCausalLM.from_pretrained(out)  # saved full precision, not 4-bit
    assert not any("4bit" in type(m).__name__ for m in merged.modules())


def test_help_explains_flags():
    result = subprocess.run([sys.executable, "train_sft.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0
    for flag in ("--model_name", "--sft_output", "--num_epochs", "--batch_size", "--use_4bit", "--max_samples",
                 "--data_dir", "--dataset", "--learning_rate", "--lora_r", "--lora_alpha", "--lora_dropout",
                 "--grad_accum", "--max_length", "--warmup_ratio", "--seed", "--gradient_checkpointing",
                 "--eval_every", "--resume"):
        assert flag in result.stdout, flag


def test_bad_data_dir_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "train_sft.py", "--model_name", "tiny", "--data_dir", str(tmp_path),
                             "--sft_output", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error:") and "Traceback" not in result.stderr


@pytest.mark.slow
def test_short_sft_teaches_the_format(sft_tiny):
    out, summary = sft_tiny
    lines = [json.loads(x) for x in (out / LOG_NAME).read_text().splitlines()]
    before = lines[0]
    assert before["step"] == 0 and before["eval_format_rate"] < 0.1  # random weights: no '#### N', no stop
    assert summary["format_rate"] > 0.8, summary
    assert lines[-1]["eval_format_rate"] == summary["format_rate"]


@pytest.mark.parametrize("finetune,weights", [("full", torch.float32), ("lora", torch.bfloat16)])
def test_full_finetuning_on_cuda_keeps_fp32_master_weights(monkeypatch, finetune, weights):
    """Under CUDA's dtype policy (asked for here with device "cuda", the load itself stood in on the CPU)
    a full fine-tune loads fp32 weights for AdamW to update (bf16 ones round small updates away; the
    forward runs under bf16 autocast); LoRA keeps the base in bf16 and trains fp32 adapters."""
    import sft.trainer as trainer

    asked = []

    def load(name, device, load_in_4bit, dtype):
        asked.append(dtype)
        return real(name, device="cpu", dtype=dtype)

    real = trainer.load_model_and_tokenizer
    monkeypatch.setattr(trainer, "load_model_and_tokenizer", load)
    model, _ = trainer._model(quick_config("unused", finetune=finetune, lora_r=4, lora_alpha=8), "cuda")
    assert asked == [weights]
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert trained == {torch.float32}
