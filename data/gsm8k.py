"""GSM8K loading: `{train,test}.jsonl` from --data_dir or $GSM8K_DIR, else the hub when online."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TypedDict

from common.errors import fail
from rewards import parse_number
from rewards.numeric import NUMBER_FORMS

SPLITS = ("train", "test")
HUB_ID, HUB_CONFIG = "openai/gsm8k", "main"


class Record(TypedDict, total=False):
    question: str
    solution: str | None  # the full worked solution, ending in '#### N' (None: answer-only data)
    answer: str  # the final answer, as written after '####' (may hold commas: '1,080')
    columns: dict  # a user's dataset's other columns, passed to reward functions


def final_answer(solution: str) -> str:
    """The ground truth after the last '####' of a gold solution, verbatim but stripped; it must be a number
    (a `#### abc` gold answer would score every completion 0 and train on nothing, silently)."""
    if "####" not in solution:
        raise ValueError("solution has no '####' final answer")
    final = solution.rsplit("####", 1)[1].strip()
    if parse_number(final) is None:
        raise ValueError(f"the solution's '####' is followed by {final[:40]!r}, not a number; {NUMBER_FORMS}")
    return final


def _record(question: object, solution: object) -> Record:
    if not isinstance(question, str) or not isinstance(solution, str):
        raise ValueError("'question' and 'answer' must be strings")
    return Record(question=question, solution=solution, answer=final_answer(solution))


def _read_jsonl(path: Path, max_samples: int | None) -> list[Record]:
    records: list[Record] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if max_samples is not None and len(records) >= max_samples:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                records.append(_record(row["question"], row["answer"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                fail(f"{path}:{lineno}: bad GSM8K line ({exc}); expected JSON with 'question' and 'answer'")
    return records


def _from_hub(split: str, max_samples: int | None) -> list[Record]:
    try:
        import datasets

        rows = datasets.load_dataset(HUB_ID, HUB_CONFIG, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, no cache, hub error: all the same fix
        fail(
            f"GSM8K not found: pass --data_dir DIR (a folder with train.jsonl and test.jsonl) or set "
            f"GSM8K_DIR; the hub ({HUB_ID}) is unreachable ({type(exc).__name__})"
        )
    if max_samples is not None:
        rows = rows.select(range(min(max_samples, len(rows))))
    return [_record(r["question"], r["answer"]) for r in rows]


def load_gsm8k(split: str, data_dir: str | None = None, max_samples: int | None = None) -> list[Record]:
    """GSM8K `split` from `data_dir` (or $GSM8K_DIR), else from the hub; the first `max_samples`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    data_dir = data_dir or os.environ.get("GSM8K_DIR") or None
    if data_dir is None:
        return _from_hub(split, max_samples)
    path = Path(data_dir).expanduser() / f"{split}.jsonl"
    if not path.is_file():
        fail(f"{path} not found: --data_dir (or GSM8K_DIR) must be a folder holding {split}.jsonl")
    return _read_jsonl(path, max_samples)
