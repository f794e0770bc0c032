"""Pure scoring: accuracy, format and truncation rates, unbiased pass@k and maj@k."""

from __future__ import annotations

from collections import Counter
from math import comb

from rewards import answers_match, parse_number


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k) for n samples of which c are correct."""
    if not 0 < k <= n:
        raise ValueError(f"need 0 < k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_correct(extracted: list[str | None], gold: str) -> bool:
    """Majority vote over the numeric answers (ties: the first seen); no answers counts as wrong."""
    values = [parse_number(x) for x in extracted]
    votes = Counter(v for v in values if v is not None)
    if not votes:
        return False
    best = max(votes.values())
    winner = next(v for v in values if v is not None and votes[v] == best)
    return answers_match(str(winner), gold)


def summarize(groups: list[list[dict]], golds: list[str]) -> dict[str, float]:
    """Metrics over per-question groups of scored samples (dicts with correct/extracted/truncated)."""
    samples = [s for g in groups for s in g]
    n = len(groups[0]) if groups else 0
    summary: dict[str, float] = {
        "num_questions": len(groups),
        "num_samples": n,
        "accuracy": sum(s["correct"] for s in samples) / max(1, len(samples)),
        "accuracy_flexible": sum(s.get("correct_flexible", False) for s in samples) / max(1, len(samples)),
        "format_rate": sum(s["extracted"] is not None and not s["truncated"] for s in samples) / max(1, len(samples)),
        "answer_rate": sum(s["extracted"] is not None for s in samples) / max(1, len(samples)),
        "truncation_rate": sum(s["truncated"] for s in samples) / max(1, len(samples)),
        "mean_completion_tokens": sum(s["num_tokens"] for s in samples) / max(1, len(samples)),
    }
    if n > 1:
        for k in sorted({1, 2, 4, 8, 16, n} & set(range(1, n + 1))):
            summary[f"pass@{k}"] = sum(pass_at_k(n, sum(s["correct"] for s in g), k) for g in groups) / len(groups)
        summary[f"maj@{n}"] = sum(majority_correct([s["extracted"] for s in g], gold)
                                  for g, gold in zip(groups, golds)) / len(groups)
    return summary
