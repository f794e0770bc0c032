"""Your own problems: a local file (.jsonl, .json, .csv, .parquet), a folder of train/test files, or a
hub dataset id (through `datasets`, offline from its cache), read into the records every stage uses.

Columns are named by `Fields` (GSM8K's by default): the question; the answer, either a bare number or
a GSM8K-style solution ending in `#### N`; and the worked solution SFT trains on (optional: answer-only
data trains with GRPO and evaluates, SFT says it needs solutions). Every other column travels with the
record to the reward functions. With no test file, a seeded share of the rows is held out as the test
split (the same rows whatever --seed is, so training never sees them) and the run says so.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import fail
from data.gsm8k import Record, final_answer
from rewards import parse_number
from rewards.latex import gold_answer, last_boxed
from rewards.numeric import NUMBER_FORMS

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
CANONICAL = ("question", "answer", "solution")  # a record's own names; a column under one is not repeated
HELDOUT_SHARE = 0.1  # of the rows, when there is no test file
SPLIT_SEED = 20240601  # fixed, so every stage and every --seed holds out the same rows
_said: set[str] = set()  # held-out messages already printed by this process


@dataclass(frozen=True)
class Fields:
    question: str = "question"
    answer: str = "answer"
    solution: str = "answer"  # GSM8K's answer column is its worked solution
    latex: bool = False  # gold answers may be LaTeX (`\frac{3}{4}`, a solution's last `\boxed{}`): --reward math_verify
    train_split: str = "train"  # the split names of a hub dataset or a folder's files (--train_split, --test_split)
    test_split: str = "test"

    def split_name(self, split: str) -> str:
        """The dataset's own name for our 'train' or 'test' split."""
        return self.train_split if split == "train" else self.test_split


def is_table_source(dataset: str) -> bool:
    """A local file or folder (anything else that is not a built-in name is a hub dataset id)."""
    return Path(dataset).expanduser().exists() or dataset.endswith(EXTENSIONS)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        fail(f"{path} not found: --dataset takes gsm8k, synthetic, a data file ({', '.join(EXTENSIONS)}), a folder "
             f"with train/test files, or a hub dataset id")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        fail(f"{path}: row {lineno}: not JSON ({exc.msg})")
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            rows = data.get("data", data.get("rows")) if isinstance(data, dict) else data
        elif suffix == ".csv":
            import csv

            with path.open(encoding="utf-8", newline="") as f:
                rows = list(csv.DictReader(f))
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        else:
            fail(f"{path}: unknown data file type {suffix!r}; use one of {', '.join(EXTENSIONS)}")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        fail(f"{path}: cannot read it ({type(exc).__name__}: {exc})")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        fail(f"{path}: expected rows of named columns (a list of objects)")
    if not rows:
        fail(f"{path} holds no rows")
    return rows


def _answer(value: Any, where: str, latex: bool = False) -> tuple[str, str | None]:
    """(final answer, worked solution or None) from an answer cell: a number, or text ending in '#### N';
    with `latex`, also an answer math-verify reads (`\\frac{3}{4}`) or a solution ending in `\\boxed{...}`."""
    if isinstance(value, bool) or value is None:
        fail(f"{where}: {value!r} is not a number (nor a solution ending in '#### N')")
    text = str(value).strip()
    after = text.rsplit("####", 1)[1] if "####" in text else text
    if latex and parse_number(after) is None:  # not a number: LaTeX, a `\boxed{}` answer first
        final = gold_answer(text if last_boxed(text) else after)
        if final is None:
            fail(f"{where}: math-verify reads no answer in {text[:40]!r} (a number, LaTeX such as \\frac{{3}}{{4}}, or "
                 f"a solution ending in \\boxed{{...}})")
        return final, text if final != text else None
    if "####" in text:
        try:
            return final_answer(text), text
        except ValueError as exc:
            fail(f"{where}: {exc}")
    if parse_number(text) is None:
        fail(f"{where}: {text[:40]!r} is not a number (nor a solution ending in '#### N'); {NUMBER_FORMS}; "
             f"LaTeX answers (\\frac, \\boxed) with --reward math_verify")
    return text, None


def to_records(rows: list[dict[str, Any]], fields: Fields, source: str) -> list[Record]:
    """Records from rows of named columns; a missing column or a non-numeric answer is one line naming
    the source, the row (1-based) and the column."""
    records = []
    for n, row in enumerate(rows, 1):
        for name, flag in ((fields.question, "--question_field"), (fields.answer, "--answer_field")):
            if name not in row:
                fail(f"{source}: row {n} has no column {name!r} (it has {', '.join(map(str, row)) or 'none'}); "
                     f"name the column with {flag}")
        question = row[fields.question]
        if not isinstance(question, str) or not question.strip():
            fail(f"{source}: row {n}, column {fields.question!r}: the question is empty or not text")
        answer, solution = _answer(row[fields.answer], f"{source}: row {n}, column {fields.answer!r}", fields.latex)
        if fields.solution != fields.answer:
            cell = row.get(fields.solution)
            solution = cell.strip() if isinstance(cell, str) and "####" in cell else None
        # every column reaches the rewards under its dataset name, as TRL passes them (`--answer_field final`
        # with `def r(completions, final, **kw)`); the canonical question/answer/solution are set apart
        columns = {k: v for k, v in row.items() if k not in CANONICAL}
        records.append({"question": question, "answer": answer, "solution": solution, "columns": columns})
    return records


def as_records(rows: list[dict[str, Any]], fields: Fields, source: str) -> list[Record]:
    """Rows handed to the Python API: records as `load_records` makes them pass as they are; anything
    else is read like a data file's rows (`fields` names the columns)."""
    if all(isinstance(r, dict) and {"question", "answer", "columns"} <= set(r) for r in rows):
        return rows
    return to_records(rows, fields, source)


def _split_files(folder: Path, split: str) -> Path | None:
    for ext in EXTENSIONS:
        if (folder / f"{split}{ext}").is_file():
            return folder / f"{split}{ext}"
    return None


def _held_out(records: list[Record], split: str, source: str) -> list[Record]:
    """The test split as a seeded share of `records`, or the rest of them as the train split."""
    order = list(range(len(records)))
    random.Random(SPLIT_SEED).shuffle(order)
    n_test = max(1, round(HELDOUT_SHARE * len(records)))
    if len(records) < 2:
        fail(f"{source}: one row cannot be split into train and test; add rows or a test file")
    if source not in _said:
        _said.add(source)
        print(f"{source}: no test file, so {n_test} of its {len(records)} rows (a seeded {HELDOUT_SHARE:.0%}) are "
              f"held out as the test split; training never sees them")
    chosen = sorted(order[:n_test]) if split == "test" else sorted(order[n_test:])
    return [records[i] for i in chosen]


def _named_split_missing(source: str, split: str, fields: Fields, has: list[str]) -> None:
    """A split the user named (not our default) that the dataset lacks: one line listing what it has."""
    fail(f"--{split}_split {fields.split_name(split)}: {source} has no such split (it has {', '.join(has) or 'none'})")


def load_table(dataset: str, split: str, fields: Fields) -> list[Record]:
    """`split` of a local file or folder: a folder's `{split}.<ext>` (named by --train_split/--test_split),
    or a held-out share."""
    path = Path(dataset).expanduser()
    if path.is_dir():
        found = _split_files(path, fields.split_name(split))
        if found is not None:
            return to_records(_read_rows(found), fields, str(found))
        if fields.split_name(split) != split:
            _named_split_missing(str(path), split, fields, sorted({f.stem for f in path.iterdir()
                                                                   if f.suffix in EXTENSIONS}))
        train = _split_files(path, fields.train_split)
        if train is None:
            fail(f"{path} holds no train file (train{'/train'.join(EXTENSIONS)})")
        return _held_out(to_records(_read_rows(train), fields, str(train)), split, str(train))
    return _held_out(to_records(_read_rows(path), fields, str(path)), split, str(path))


def hub_id(dataset: str) -> tuple[str, str | None]:
    """(dataset id, configuration or None) of `--dataset ID` or `--dataset ID:CONFIG` (openai/gsm8k:main)."""
    name, _, config = dataset.partition(":")
    return name, config or None


def load_hub(dataset: str, split: str, fields: Fields) -> list[Record]:
    """A hub dataset's `split` through `datasets` (offline: from its cache), `ID:CONFIG` naming one of its
    configurations; a missing test split is held out. What failed is said as it is (a configuration to
    name, the hub out of reach, an unknown id), in one line."""
    name, config = hub_id(dataset)
    try:
        import datasets
    except ImportError:
        fail(f"--dataset {dataset}: a hub dataset needs the datasets package: pip install datasets")
    try:
        splits = datasets.load_dataset(name, config)
    except Exception as exc:  # noqa: BLE001 - said as it is, with the fix for the usual causes
        why = " ".join(str(exc).split())[:240]
        if "config" in why.lower() and ("missing" in why.lower() or "available" in why.lower()):
            fix = "name one as --dataset ID:CONFIG"
        elif isinstance(exc, ConnectionError) or "offline" in why.lower():
            fix = "offline, a hub dataset loads only from its cache; pass a .jsonl/.json/.csv/.parquet file or a folder"
        else:
            fix = "pass a hub id (ID or ID:CONFIG), a .jsonl/.json/.csv/.parquet file or a folder"
        fail(f"cannot load dataset {dataset!r}: {type(exc).__name__}: {why}; {fix}")
    wanted = fields.split_name(split)
    if wanted in splits:
        return to_records(list(splits[wanted]), fields, f"{dataset} [{wanted}]")
    if wanted != split or fields.train_split not in splits:
        _named_split_missing(repr(dataset), split if wanted != split else "train", fields, list(splits))
    return _held_out(to_records(list(splits[fields.train_split]), fields, f"{dataset} [{fields.train_split}]"),
                     split, dataset)
