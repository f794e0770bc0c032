"""The data flags SFT, GRPO and eval share, declared once: which dataset, and which of its columns."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

from common.flags import Rule, flag
from data.tables import Fields

DATA, PROMPT = "data", "prompt (shared by SFT, GRPO and eval; saved beside the model)"


@dataclass
class DataFlags:
    dataset: str = flag("gsm8k", "gsm8k, synthetic (offline), a data file (.jsonl/.json/.csv/.parquet), a folder "
                                 "with train/test files, or a hub dataset id (ID:CONFIG names a configuration: "
                                 "openai/gsm8k:main)", group=DATA)
    train_split: str = flag("train", "the split to train on (a hub dataset's, or a folder's <name>.<ext> file)",
                            group=DATA)
    test_split: str = flag("test", "the held-out split (evals); when the dataset has no 'test', a seeded 10%% of the "
                                   "train split is held out", group=DATA)
    data_dir: str | None = flag(None, "folder with GSM8K's jsonl files (default: $GSM8K_DIR, else the hub)",
                                group=DATA, on_resume="may")
    question_field: str = flag("question", "the dataset's question column", group=DATA)
    answer_field: str = flag("answer", "its answer column: a bare number, or a solution ending in '#### N'",
                             group=DATA)
    solution_field: str = flag("answer", "its worked-solution column (SFT's targets; GSM8K's answers)", group=DATA)
    # the prompt (data/prompt.py): None = the one saved beside the model (prompt_format.json), else the default
    system_prompt: str | None = flag(None, "a system message before the question (default: none, or the one the "
                                           "model was trained with)", group=PROMPT)
    instruction: str | None = flag(None, "the user turn's instruction; '{question}' in it places the question, "
                                         "else the question comes first and this on the next line (default: "
                                         "answer as '#### <number>')", group=PROMPT)
    chat_template_kwargs: str | None = flag(None, "JSON object passed to the chat template (default: "
                                                  "'{\"enable_thinking\": false}')", group=PROMPT)
    enable_thinking: bool = flag(False, "Qwen3's thinking mode: the model thinks in <think>...</think>, the answer "
                                        "is read after it (shorthand for --chat_template_kwargs "
                                        "'{\"enable_thinking\": true}')", group=PROMPT)

    RULES: ClassVar[tuple[Rule, ...]] = (  # settings that contradict each other, checked with the ranges
        Rule(("enable_thinking", "chat_template_kwargs"), lambda c: c.enable_thinking and _thinking_off(c) and (
            "--enable_thinking with --chat_template_kwargs '{\"enable_thinking\": false}': give one of them")),
    )

    def fields(self) -> Fields:
        # gold in LaTeX is an answer only when a reward that reads LaTeX scores it
        latex = "math_verify" in (getattr(self, "reward", None) or ())
        return Fields(self.question_field, self.answer_field, self.solution_field, latex, self.train_split,
                      self.test_split)


def _thinking_off(flags: Any) -> bool:
    """Whether --chat_template_kwargs turns thinking off (text that is no JSON object is data/prompt.py's error)."""
    try:
        kwargs = json.loads(flags.chat_template_kwargs or "{}")
    except ValueError:
        return False
    return isinstance(kwargs, dict) and kwargs.get("enable_thinking") is False


@dataclass
class TrainDataFlags(DataFlags):
    eval_dataset: tuple[str, ...] | None = flag(
        None, "take the held-out problems from this dataset's test split instead of --dataset's (same forms; e.g. "
              "train on some kinds, watch a new one); give it several times, as NAME=DATASET, to watch several "
              "(each logged as eval_<NAME>_accuracy; the first is also eval_accuracy)", group=DATA)
