"""Is B better than A, or is the difference noise? A paired comparison of two evals on the same problems.

    python -m eval.compare runs/tiny/eval/sft runs/tiny/eval/grpo

Reads each folder's eval_predictions.jsonl (the first completion of each problem: the greedy one in a
greedy eval) and prints each accuracy, the difference B - A, a paired bootstrap 95% interval of it
(10,000 resamples of the problems, seeded), McNemar's exact p-value (the two-sided binomial test on the
problems exactly one of them solves) and the problems fixed (A wrong, B right) and broken (A right,
B wrong): a table for people, then one JSON line (`accuracy_a`, `accuracy_b`, `difference`, `ci95`,
`mcnemar_p`, `fixed`, `broken`, `problems`). `--score flexible` compares the last-number scores.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from common.errors import fail, run_cli
from common.flags import OneLineParser

PREDICTIONS = "eval_predictions.jsonl"
RESAMPLES = 10_000


def read_correct(folder: Path, key: str = "correct") -> dict[tuple[str, str], bool]:
    """(question, gold) -> whether its first completion scored, in file order."""
    path = folder / PREDICTIONS
    if not path.is_file():
        fail(f"{path} not found: pass a folder `python -m eval --output` wrote")
    out: dict[tuple[str, str], bool] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            problem, correct = (row["question"], str(row["gold"])), row[key]
        except (ValueError, KeyError, TypeError) as exc:
            fail(f"{path}:{n}: not a prediction line ({type(exc).__name__}: {exc}); rerun the eval")
        out.setdefault(problem, bool(correct))
    if not out:
        fail(f"{path} holds no predictions")
    return out


def mcnemar_p(fixed: int, broken: int) -> float:
    """Exact two-sided McNemar p-value: 2 x P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2), at most 1."""
    n = fixed + broken
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(fixed, broken) + 1)) / 2**n
    return min(1.0, 2 * tail)


def bootstrap_ci(a: list[bool], b: list[bool], resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap 95% interval of accuracy(b) - accuracy(a): the same resampled problems for both."""
    import numpy as np

    diffs = np.array([int(y) - int(x) for x, y in zip(a, b)], dtype=np.float64)
    rng = np.random.default_rng(seed)
    stats = np.concatenate([diffs[rng.integers(0, len(diffs), size=(min(1000, resamples - s), len(diffs)))].mean(1)
                            for s in range(0, resamples, 1000)])
    low, high = np.percentile(stats, [2.5, 97.5])
    return float(low), float(high)


def compare(a: dict[tuple[str, str], bool], b: dict[tuple[str, str], bool], names: tuple[str, str] = ("A", "B"),
            resamples: int = RESAMPLES) -> dict[str, Any]:
    only_a, only_b = [p for p in a if p not in b], [p for p in b if p not in a]
    if only_a or only_b:
        first = (only_a or only_b)[0][0]
        fail(f"{names[0]} and {names[1]} were evaluated on different problems: {len(only_a)} only in {names[0]}, "
             f"{len(only_b)} only in {names[1]} (e.g. {first[:60]!r}); evaluate both on the same --dataset/--split/"
             f"--max_samples")
    xs = list(a.values())
    ys = [b[p] for p in a]
    fixed = sum(1 for x, y in zip(xs, ys) if not x and y)
    broken = sum(1 for x, y in zip(xs, ys) if x and not y)
    acc_a, acc_b = sum(xs) / len(xs), sum(ys) / len(ys)
    low, high = bootstrap_ci(xs, ys, resamples)
    return {"accuracy_a": acc_a, "accuracy_b": acc_b, "difference": acc_b - acc_a, "ci95": [low, high],
            "mcnemar_p": mcnemar_p(fixed, broken), "fixed": fixed, "broken": broken, "problems": len(xs)}


def table(result: dict[str, Any], a: str, b: str) -> str:
    low, high = result["ci95"]
    return "\n".join([
        f"{'A':<4} {result['accuracy_a']:.3f}  {a}",
        f"{'B':<4} {result['accuracy_b']:.3f}  {b}",
        f"B - A {result['difference']:+.3f}  paired bootstrap 95% interval [{low:+.3f}, {high:+.3f}]; "
        f"McNemar exact p = {result['mcnemar_p']:.3g}",
        f"fixed {result['fixed']} (A wrong, B right), broken {result['broken']} (A right, B wrong), "
        f"of {result['problems']} problems"
        + ("; the interval holds 0: the difference may be noise" if low <= 0 <= high else ""),
    ])


def main(argv: list[str] | None = None) -> None:
    p = OneLineParser(prog="python -m eval.compare", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="eval output folder of the baseline")
    p.add_argument("b", help="eval output folder to compare with it")
    p.add_argument("--score", default="strict", help="strict (the '#### N' answer) or flexible (the last number)")
    args = p.parse_args(argv)
    if args.score not in ("strict", "flexible"):
        fail(f"--score must be one of strict, flexible (got {args.score})")
    key = "correct" if args.score == "strict" else "correct_flexible"
    result = compare(read_correct(Path(args.a), key), read_correct(Path(args.b), key), (args.a, args.b))
    print(table(result, args.a, args.b))
    print("JSON " + json.dumps({"a": args.a, "b": args.b, "score": args.score, **result}))


if __name__ == "__main__":
    run_cli(main)
