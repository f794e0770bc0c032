"""Datasets (GSM8K from disk or hub, the synthetic default) and the one prompt format."""

from __future__ import annotations

from data.gsm8k import Record, final_answer, load_gsm8k
from data.synthetic import make_synthetic

DATASETS = ("gsm8k", "synthetic")


def load_records(
    dataset: str,
    split: str,
    data_dir: str | None = None,
    max_samples: int | None = None,
    seed: int = 0,
) -> list[Record]:
    """Records of `dataset` ('gsm8k' or 'synthetic') for `split` ('train' or 'test')."""
    if dataset == "gsm8k":
        return load_gsm8k(split, data_dir=data_dir, max_samples=max_samples)
    if dataset == "synthetic":
        return make_synthetic(split, max_samples=max_samples, seed=seed)
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")


__all__ = ["DATASETS", "Record", "final_answer", "load_gsm8k", "load_records", "make_synthetic"]
