"""A model card (README.md) for a saved model folder, made from what the run left in it: run_config.json
(base model, data, recipe), prompt_format.json (how to prompt it) and eval/ (held-out results, each with
its 95% interval). Every saved model folder gets one, pushed to the hub or not."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from data import main_eval_name
from data.tables import hub_id, is_table_source

CARD = "README.md"
RECIPE = {  # the settings a card shows, per stage, in this order (others stay in run_config.json)
    "sft": ("finetune", "num_epochs", "max_steps", "batch_size", "grad_accum", "learning_rate", "lr_decay",
            "max_length", "lora_r", "lora_alpha", "lora_dropout", "use_4bit", "seed"),
    "grpo": ("finetune", "max_steps", "prompts_per_step", "num_generations", "max_completion_length", "temperature",
             "learning_rate", "beta", "epsilon", "loss_type", "scale_rewards", "num_iterations", "reward",
             "reward_weights", "dynamic_sampling", "top_entropy_quantile", "entropy_coef", "lora_r", "lora_alpha",
             "use_4bit", "seed"),
}
_LORA = lambda config: config.get("finetune") == "lora"  # noqa: E731
# A setting shown only when it applied to the run: LoRA's only to a LoRA run, a switch only when on, an
# optional control only away from its default (a full fine-tune's card lists no LoRA rank).
APPLIES = {
    "lora_r": _LORA, "lora_alpha": _LORA, "lora_dropout": _LORA,
    "use_4bit": lambda c: _LORA(c) and c.get("use_4bit") is True,
    "dynamic_sampling": lambda c: c.get("dynamic_sampling") is True,
    "top_entropy_quantile": lambda c: c.get("top_entropy_quantile", 1.0) < 1.0,
    "entropy_coef": lambda c: c.get("entropy_coef", 0.0) != 0.0,
}


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion p measured on n problems."""
    if n <= 0:
        return 0.0, 1.0
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _evals(folder: Path, config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, summary) of the main held-out eval and of each named one beside it."""
    out = []
    main = _read(folder / "eval" / "eval_summary.json")
    if main:
        name = main_eval_name(SimpleNamespace(eval_dataset=config.get("eval_dataset"),
                                              dataset=config.get("dataset") or "held-out"))
        out.append((name, main))
    for sub in sorted((folder / "eval").glob("*/eval_summary.json")):
        if not sub.parent.name.startswith("step_"):
            out.append((sub.parent.name, _read(sub)))
    return out


def started_from(config: dict[str, Any], seen: int = 0) -> tuple[str, str | None]:
    """(what the card calls the model a run started from, its hub id or None): a hub id as it is; a local
    folder by its name only (never its absolute path), and the hub id that folder's own run started from
    when it has one (a GRPO run from an SFT folder names the SFT run's base: Qwen/Qwen3-0.6B)."""
    start = str(config.get("start_model") or config.get("model_name") or "unknown")
    path = Path(start).expanduser()
    if not path.exists():
        return start, start if "/" in start and not start.startswith((".", "/", "~")) else None
    earlier = _read(path / "run_config.json")
    if earlier and seen < 8:
        _, hub = started_from(earlier, seen + 1)
        if hub:
            return hub, hub
    return path.resolve().name, None


def _front_matter(folder: Path, config: dict[str, Any], hub: str | None, tags: list[str],
                  evals: list[tuple[str, dict[str, Any]]]) -> str:
    """The card's metadata through huggingface_hub's card classes: base model, tags, the dataset, and each
    held-out result as the hub's `model-index` (what the hub renders as evaluation results)."""
    from huggingface_hub import EvalResult, ModelCardData

    dataset = str(config.get("dataset") or "")
    dataset_id = "openai/gsm8k" if dataset == "gsm8k" else (
        hub_id(dataset)[0] if dataset and "/" in dataset and not is_table_source(dataset) else None)
    results = [EvalResult(task_type="text-generation", task_name="math word problems",
                          dataset_type=dataset_id or name, dataset_name=name, dataset_split="test",
                          metric_type="accuracy", metric_value=round(float(s.get("accuracy", 0.0)), 4),
                          metric_name=f"accuracy (greedy, {int(s.get('num_questions', 0))} problems)")
               for name, s in evals if s.get("num_questions")]
    data = ModelCardData(library_name="transformers", base_model=hub, tags=tags,
                         datasets=[dataset_id] if dataset_id else None, model_name=folder.resolve().name,
                         eval_results=results or None)
    return "---\n" + data.to_yaml() + "\n---"


def model_card(folder: Path) -> str:
    """The card's text for `folder`."""
    config, fmt = _read(folder / "run_config.json"), _read(folder / "prompt_format.json")
    stage = config.get("stage", "")
    base, hub = started_from(config)
    data = config.get("dataset", "unknown")
    tags = [t for t in ["qwen-gsm8k-grpo", stage] + (["lora"] if config.get("finetune") == "lora" else []) if t]
    evals = _evals(folder, config)
    lines = [_front_matter(folder, config, hub, tags, evals), "",
             f"# {folder.resolve().name}", "",
             f"{stage.upper() or 'A model'} fine-tune of `{base}` trained with "
             f"qwen-gsm8k-grpo on `{data}`.", ""]
    recipe = [(k, config[k]) for k in RECIPE.get(stage, ()) if k in config and config[k] not in (None, ())
              and APPLIES.get(k, lambda c: True)(config)]
    if recipe:
        lines += ["## Recipe", "", "| setting | value |", "| --- | --- |",
                  *[f"| `{k}` | {', '.join(map(str, v)) if isinstance(v, list) else v} |" for k, v in recipe],
                  "", "Every setting is in `run_config.json`; `train_" + (stage or "grpo") +
                  ".py --config run_config.json` replays the run.", ""]
    if evals:
        lines += ["## Held-out results", "", "Greedy decoding; 95% Wilson intervals over the problems scored.", "",
                  "| set | problems | accuracy | 95% interval | flexible accuracy | format rate |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, s in evals:
            n, acc = int(s.get("num_questions", 0)), float(s.get("accuracy", 0.0))
            low, high = wilson(acc, n)
            lines.append(f"| {name} | {n} | {acc:.3f} | [{low:.3f}, {high:.3f}] | "
                         f"{float(s.get('accuracy_flexible', 0.0)):.3f} | {float(s.get('format_rate', 0.0)):.3f} |")
        lines.append("")
    lines += ["## Prompt", "", "The model answers in the format it was trained on (`prompt_format.json`): the "
              "question as a chat user turn, the answer ending in `#### <number>`.", ""]
    if fmt:
        lines += ["```json", json.dumps(fmt, indent=1), "```", ""]
    lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{folder.resolve().name}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{folder.resolve().name}")', "```", ""]
    return "\n".join(lines)


def write_model_card(folder: Path) -> Path:
    """README.md in `folder`, written atomically."""
    path = folder / CARD
    tmp = folder / f".{CARD}.tmp"
    tmp.write_text(model_card(folder))
    os.replace(tmp, path)
    return path
