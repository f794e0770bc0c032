"""Datasets (GSM8K from disk or hub, the synthetic default) and the one prompt format."""

from __future__ import annotations

from typing import Any

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
    if dataset == "gsm8k":
        return load_gsm8k(split, data_dir=data_dir, max_samples=max_samples)
    if dataset == "synthetic" or dataset.startswith("synthetic:"):
        kinds = parse_kinds(dataset) if ":" in dataset else None
        return make_synthetic(split, max_samples=max_samples, seed=seed, kinds=kinds)
    fields = fields or Fields()
    records = load_table(dataset, split, fields) if is_table_source(dataset) else load_hub(dataset, split, fields)
    return records[:max_samples] if max_samples is not None else records


def run_records(cfg: Any, train_rows: list[Any] | None = None,
                eval_rows: list[Any] | None = None) -> tuple[list[Record], list[Record]]:
    """A run's training and held-out records: rows handed to the Python API when given, else the train
    split of `cfg.dataset` and the test split of `cfg.eval_dataset` (default: `cfg.dataset`); `cfg` has
    TrainDataFlags' fields, max_samples, eval_samples and seed."""
    from common.errors import fail

    fields = cfg.fields()
    if train_rows is not None:
        train = as_records(train_rows, fields, "train_records")[: cfg.max_samples]
    else:
        train = load_records(cfg.dataset, "train", cfg.data_dir, cfg.max_samples, cfg.seed, fields)
    if eval_rows is not None:
        held_out = as_records(eval_rows, fields, "eval_records")[: cfg.eval_samples]
    else:
        held_out = load_records(cfg.eval_dataset or cfg.dataset, "test", cfg.data_dir, cfg.eval_samples, cfg.seed,
                                fields)
    if not train:
        fail("no training examples: check --dataset/--data_dir/--max_samples")
    return train, held_out


def require_solutions(records: list[Record], dataset: str, fields: Fields | None) -> None:
    """SFT's check: every record has a worked solution to train on."""
    from common.errors import fail

    missing = next((i for i, r in enumerate(records, 1) if not r.get("solution")), None)
    if missing is not None:
        field = (fields or Fields()).solution
        fail(f"SFT needs worked solutions ending in '#### N', and {dataset} has none in column {field!r} (row "
             f"{missing}); name that column with --solution_field, or train this data with GRPO, which needs only "
             f"final answers")


__all__ = ["DATASETS", "Fields", "Record", "as_records", "final_answer", "load_gsm8k", "load_records", "make_synthetic",
           "require_solutions", "run_records", "to_records"]
