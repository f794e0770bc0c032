"""Publishing a run (models/card.py, models/push.py): every saved model folder gets a model card made
from the run; --push_to_hub is checked before training and uploads with the hub client (monkeypatched:
no network here)."""

from __future__ import annotations

import json
import re

import pytest

from common.errors import UserError
from grpo.trainer import GRPOConfig, train_grpo
from models.card import model_card, wilson


def _cfg(out, **overrides) -> GRPOConfig:
    base = dict(model_name="tiny", dataset="synthetic", grpo_output=str(out), max_steps=1, prompts_per_step=2,
                num_generations=2, max_completion_length=8, eval_every=1, eval_samples=5, eval_max_new_tokens=8,
                device="cpu", show_progress=False, eval_dataset=("new=synthetic:times_more", "seen=synthetic:add"))
    return GRPOConfig(**{**base, **overrides})


class FakeHub:
    """huggingface_hub's HfApi and get_token, recording what a push does."""

    def __init__(self, monkeypatch, token="hf_x", whoami_raises=None):
        import huggingface_hub

        self.calls = []
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: token)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # online, as far as checks go
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        hub = self

        class Api:
            def whoami(self):
                hub.calls.append(("whoami",))
                if whoami_raises:
                    raise whoami_raises
                return {"name": "me"}

            def create_repo(self, repo_id, private=False, exist_ok=False):
                hub.calls.append(("create_repo", repo_id, exist_ok))
                return f"https://huggingface.co/{repo_id}"

            def upload_folder(self, repo_id, folder_path, ignore_patterns, commit_message):
                hub.calls.append(("upload_folder", repo_id, folder_path, ignore_patterns))

        monkeypatch.setattr(huggingface_hub, "HfApi", Api)


def test_wilson_interval_by_hand():
    # p = 0.5, n = 100: centre 0.5, half-width 1.96 * sqrt(0.0025 + 0.000096) / 1.0384 = 0.0962
    low, high = wilson(0.5, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert wilson(0.0, 10)[0] == 0.0 and wilson(1.0, 10)[1] == 1.0


def test_every_saved_model_gets_a_card_from_its_run(tmp_path):
    out = tmp_path / "run"
    train_grpo(_cfg(out, learning_rate=3e-6))
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "| `learning_rate` | 3e-06 |" in card and "| `loss_type` | dapo |" in card
    summary = json.loads((out / "eval" / "eval_summary.json").read_text())
    low, high = wilson(summary["accuracy"], 5)
    assert f"| new | 5 | {summary['accuracy']:.3f} | [{low:.3f}, {high:.3f}] |" in card  # the main set
    assert "| seen | 5 |" in card  # and each other named held-out set
    assert '"instruction"' in card or "prompt_format.json" in card
    assert card == model_card(out)  # made from the folder alone: python -m models.push makes the same


def test_push_is_refused_before_training_without_a_token_or_with_a_bad_name(tmp_path, monkeypatch):
    FakeHub(monkeypatch, token=None)
    with pytest.raises(UserError, match=r"^--push_to_hub me/model: no Hugging Face token; set HF_TOKEN or run "
                                        r"`hf auth login` first"):
        train_grpo(_cfg(tmp_path / "a", push_to_hub="me/model"))
    FakeHub(monkeypatch)
    with pytest.raises(UserError, match=r"^--push_to_hub 'model': give the repository as NAMESPACE/NAME"):
        train_grpo(_cfg(tmp_path / "b", push_to_hub="model"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing ran


def test_push_uploads_the_folder_without_checkpoint_or_tracker_files(tmp_path, monkeypatch, capsys):
    hub = FakeHub(monkeypatch)
    out = tmp_path / "run"
    train_grpo(_cfg(out, push_to_hub="me/model"))
    assert hub.calls[0] == ("whoami",) and hub.calls[1] == ("create_repo", "me/model", True)
    kind, repo, folder, ignored = hub.calls[2]
    assert (kind, repo, folder) == ("upload_folder", "me/model", str(out))
    assert "checkpoint/**" in ignored and "tracker/**" in ignored
    assert "pushed to https://huggingface.co/me/model" in capsys.readouterr().out
    # the same from the command line, for a folder trained earlier
    from models.push import main

    hub.calls.clear()
    main([str(out), "me/other"])
    assert [c[0] for c in hub.calls] == ["whoami", "create_repo", "upload_folder"] and hub.calls[2][1] == "me/other"
    with pytest.raises(UserError, match="holds no saved model"):
        main([str(tmp_path), "me/other"])


class _Refused(Exception):
    response = type("Response", (), {"status_code": 401})()


@pytest.mark.parametrize("raises,says", [
    (OSError("[Errno -2] Name or service not known"), "cannot reach the Hugging Face hub (OSError: [Errno -2] Name "
                                                      "or service not known); check the network"),
    (_Refused("401 Unauthorized"), "the hub refused the Hugging Face token (401); run `hf auth login` again"),
])
def test_push_is_refused_before_training_when_the_hub_is_out_of_reach_or_refuses_the_token(tmp_path, monkeypatch,
                                                                                           raises, says):
    FakeHub(monkeypatch, whoami_raises=raises)
    with pytest.raises(UserError, match="^--push_to_hub me/model: " + re.escape(says)) as err:
        train_grpo(_cfg(tmp_path / "a", push_to_hub="me/model"))
    assert "\n" not in str(err.value) and not (tmp_path / "a").exists()


def test_push_in_offline_mode_with_a_token_is_refused_before_training(tmp_path):
    """The hub client in offline mode (HF_HUB_OFFLINE=1) and a token set: one line, exit 2, nothing trained
    (it used to train the whole run, then end in OfflineModeIsEnabled)."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_not_a_real_token"}
    result = subprocess.run([sys.executable, "train_grpo.py", "--model_name", "tiny", "--max_steps", "1",
                             "--grpo_output", str(out), "--push_to_hub", "me/model", "--device", "cpu"],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: --push_to_hub me/model: the hub client is in offline mode "
                                    "(HF_HUB_OFFLINE is set); unset HF_HUB_OFFLINE to publish")
    assert not out.exists()


def _run_folder(path, config, accuracy=None, n=40):
    path.mkdir(parents=True)
    (path / "run_config.json").write_text(json.dumps(config))
    if accuracy is not None:
        (path / "eval").mkdir()
        (path / "eval" / "eval_summary.json").write_text(json.dumps({"accuracy": accuracy, "num_questions": n,
                                                                      "accuracy_flexible": accuracy,
                                                                      "format_rate": 1.0}))
    return path


def test_the_card_names_the_hub_model_it_started_from_and_only_the_settings_that_applied(tmp_path):
    """Metadata through huggingface_hub's ModelCardData: the base model's hub id (followed through the SFT
    folder the GRPO run started from), never a local absolute path; each held-out result in model-index;
    a full fine-tune's recipe has no LoRA settings, a LoRA run's has them."""
    from huggingface_hub import ModelCard

    sft = _run_folder(tmp_path / "sft", {"stage": "sft", "start_model": "Qwen/Qwen3-0.6B", "dataset": "gsm8k"})
    grpo = _run_folder(tmp_path / "grpo", {"stage": "grpo", "start_model": str(sft), "dataset": "gsm8k",
                                           "finetune": "full", "lora_r": 16, "lora_alpha": 32, "use_4bit": False,
                                           "dynamic_sampling": False, "learning_rate": 1e-6,
                                           "top_entropy_quantile": 1.0, "entropy_coef": 0.0}, accuracy=0.625)
    text = model_card(grpo)
    card = ModelCard(text)
    assert card.data.base_model == "Qwen/Qwen3-0.6B" and card.data.datasets == ["openai/gsm8k"]
    (result,) = card.data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_type, result.dataset_split) == \
        ("accuracy", 0.625, "openai/gsm8k", "test")
    assert str(tmp_path) not in text and "fine-tune of `Qwen/Qwen3-0.6B`" in text
    for absent in ("lora_r", "lora_alpha", "use_4bit", "dynamic_sampling", "top_entropy_quantile", "entropy_coef"):
        assert f"`{absent}`" not in text, absent
    assert "| `learning_rate` | 1e-06 |" in text

    lora = _run_folder(tmp_path / "lora", {"stage": "grpo", "start_model": str(tmp_path / "sft"), "finetune": "lora",
                                           "lora_r": 8, "lora_alpha": 16, "use_4bit": True, "entropy_coef": 0.01})
    text = model_card(lora)
    assert "| `lora_r` | 8 |" in text and "| `use_4bit` | True |" in text and "| `entropy_coef` | 0.01 |" in text
    # a local folder with no hub id behind it is named by its name alone, and is no base_model
    local = _run_folder(tmp_path / "from_local", {"stage": "grpo", "start_model": str(tmp_path / "lora")})
    (tmp_path / "lora" / "run_config.json").write_text(json.dumps({"stage": "grpo", "start_model": "tiny"}))
    text = model_card(local)
    assert ModelCard(text).data.base_model is None and "fine-tune of `lora`" in text and str(tmp_path) not in text
