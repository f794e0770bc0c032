"""Datasets (GSM8K from disk or hub, the synthetic default) and the one prompt format."""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import PurePath
from typing import Any

from common.errors import fail
from data.gsm8k import Record, final_answer, load_gsm8k
from data.synthetic import make_synthetic, parse_kinds
from data.tables import Fields, as_records, is_table_source, load_hub, load_table, to_records

DATASETS = ("gsm8k", "synthetic")  # built-in names (synthetic:<kinds> too); also a file, a folder or a hub id


def load_records(
    dataset: str,
    split: str,
    data_dir: str | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    fields: Fields | None = None,
) -> list[Record]:
    """Records of `dataset` for `split` ('train' or 'test'): 'gsm8k', 'synthetic', a local data file or
    folder, or a hub dataset id (data/tables.py), the first `max_samples` of them."""
    if fields is not None and (dataset == "gsm8k" or dataset.split(":")[0] == "synthetic") and \
            (fields.train_split, fields.test_split) != ("train", "test"):
        fail(f"--train_split/--test_split name a hub dataset's or a folder's splits; {dataset}'s are train and test")
    if dataset == "gsm8k":
        return load_gsm8k(split, data_dir=data_dir, max_samples=max_samples)
    if dataset == "synthetic" or dataset.startswith("synthetic:"):
        kinds = parse_kinds(dataset) if ":" in dataset else None
        return make_synthetic(split, max_samples=max_samples, seed=seed, kinds=kinds)
    fields = fields or Fields()
    records = load_table(dataset, split, fields) if is_table_source(dataset) else load_hub(dataset, split, fields)
    return records[:max_samples] if max_samples is not None else records


def eval_specs(cfg: Any) -> list[tuple[str, str]]:
    """(name, dataset) of each --eval_dataset, in order: `NAME=DATASET`, or a name made from the dataset
    (synthetic:times_more -> times_more, data/mine.jsonl -> mine, org/set -> set)."""
    given = cfg.eval_dataset
    specs = [] if not given else [given] if isinstance(given, str) else list(given)
    out = []
    for spec in specs:
        named = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.+)", spec)
        out.append((named.group(1), named.group(2)) if named else (_name_of(spec), spec))
    names = [n for n, _ in out]
    if len(set(names)) < len(names):
        fail(f"--eval_dataset: two held-out sets are both named {max(names, key=names.count)!r}; name them as "
             f"NAME=DATASET")
    return out


def _name_of(spec: str) -> str:
    tail = spec.split(":", 1)[1] if spec.startswith("synthetic:") else PurePath(spec).stem
    return re.sub(r"[^A-Za-z0-9_]+", "_", tail).strip("_") or "eval"


def main_eval_name(cfg: Any, eval_rows: list[Any] | None = None) -> str:
    """The main held-out set's name (in eval_<name>_* fields when several sets are watched)."""
    specs = eval_specs(cfg)
    if eval_rows is not None:
        return "eval_records"
    return specs[0][0] if specs else _name_of(cfg.dataset)


def other_eval_sets(cfg: Any, eval_rows: list[Any] | None = None) -> dict[str, list[Record]]:
    """The held-out sets watched besides the main one (`run_records`' second value), by name: every
    --eval_dataset after the first (all of them when the Python API hands its own eval rows)."""
    specs = eval_specs(cfg)
    return {name: load_records(spec, "test", cfg.data_dir, cfg.eval_samples, cfg.seed, eval_fields(cfg, spec))
            for name, spec in (specs if eval_rows is not None else specs[1:])}


def eval_fields(cfg: Any, spec: str) -> Fields:
    """The columns an --eval_dataset is read with: the run's, and --train_split/--test_split only for the
    run's own dataset (another set, synthetic or a hub id, keeps its own train and test)."""
    fields = cfg.fields()
    return fields if spec == cfg.dataset else dataclasses.replace(fields, train_split="train", test_split="test")


def split_validation(train: list[Record], n: int, seed: int) -> tuple[list[Record], list[Record]]:
    """(the training records left, `n` held back to choose the best model): a seeded draw, the rest kept in
    their order."""
    if n >= len(train):
        fail(f"--validation_samples {n} would leave no training data ({len(train)} examples); lower it")
    held = set(random.Random(seed).sample(range(len(train)), n))
    return [r for i, r in enumerate(train) if i not in held], [train[i] for i in sorted(held)]


def run_records(cfg: Any, train_rows: list[Any] | None = None,
                eval_rows: list[Any] | None = None) -> tuple[list[Record], list[Record]]:
    """A run's training and held-out records: rows handed to the Python API when given, else the train
    split of `cfg.dataset` and the test split of the first `cfg.eval_dataset` (default: `cfg.dataset`);
    `cfg` has TrainDataFlags' fields, max_samples, eval_samples and seed."""
    fields = cfg.fields()
    if train_rows is not None:
        train = as_records(train_rows, fields, "train_records")[: cfg.max_samples]
    else:
        train = load_records(cfg.dataset, "train", cfg.data_dir, cfg.max_samples, cfg.seed, fields)
    if eval_rows is not None:
        held_out = as_records(eval_rows, fields, "eval_records")[: cfg.eval_samples]
    else:
        specs = eval_specs(cfg)
        held_out = load_records(specs[0][1] if specs else cfg.dataset, "test", cfg.data_dir, cfg.eval_samples,
                                cfg.seed, eval_fields(cfg, specs[0][1] if specs else cfg.dataset))
    if not train:
        fail("no training examples: check --dataset/--data_dir/--max_samples")
    return train, held_out


def require_solutions(records: list[Record], dataset: str, fields: Fields | None) -> None:
    """SFT's check: every record has a worked solution to train on."""
    missing = next((i for i, r in enumerate(records, 1) if not r.get("solution")), None)
    if missing is not None:
        field = (fields or Fields()).solution
        fail(f"SFT needs worked solutions ending in '#### N', and {dataset} has none in column {field!r} (row "
             f"{missing}); name that column with --solution_field, or train this data with GRPO, which needs only "
             f"final answers")


__all__ = ["DATASETS", "Fields", "Record", "as_records", "eval_specs", "final_answer", "load_gsm8k", "load_records",
           "main_eval_name", "make_synthetic", "other_eval_sets", "require_solutions", "run_records",
           "split_validation", "to_records"]
