"""Seeded GSM8K-style word problems (one or two arithmetic steps) that a tiny model learns on a CPU.

The offline default dataset for demos and learning tests. Records have GSM8K's fields, with
`<<a*b=c>>` calculator annotations and a final `#### N` line. Train and test never share a
question: each question is assigned to a split by a stable hash of its text.

Seven kinds of problem (KINDS); `--dataset synthetic:<kind>,<kind>` draws only those (a kind named
twice, twice as often), so a run can train on some kinds and meet a new kind later (the demo: SFT on
six, GRPO on the answers of all seven, half of them the new kind).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

from common.errors import fail
from data.gsm8k import Record

NAMES = ["Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kim", "Leo", "Mia", "Noor"]
ITEMS = ["apples", "books", "cards", "eggs", "pens", "shells", "stamps", "marbles", "cookies", "stickers"]
DISTRACTORS = [
    "It is a sunny day.",
    "{n2} likes to sing.",
    "The shop opens at {d} o'clock.",
    "{n2} has a red bike.",
    "There are {d} birds on the roof.",
]
SIZES = {"train": 5000, "test": 500}
TEST_SHARE = 10  # one question in TEST_SHARE goes to the test split


def _product(who: str, a: int, b: int, unit: str) -> str:
    """A worked multiplication step: `who` a * b = <<a*b=ab>>ab `unit`."""
    return f"{who} {a} * {b} = <<{a}*{b}={a * b}>>{a * b} {unit}."


def _less(n: str, total: int, c: int, unit: str) -> str:
    """A worked subtraction step: n has total - c = <<total-c=rest>>rest `unit` left."""
    return f"{n} has {total} - {c} = <<{total}-{c}={total - c}>>{total - c} {unit} left."


def _add(r: random.Random, n: str, n2: str, it: str) -> tuple[str, str, int]:
    a, b = r.randint(2, 15), r.randint(2, 15)
    return (f"{n} has {a} {it}. {n2} gives {n} {b} more {it}. How many {it} does {n} have now?",
            f"{n} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {it} now.", a + b)


def _sub(r: random.Random, n: str, n2: str, it: str) -> tuple[str, str, int]:
    a = r.randint(6, 20)
    b = r.randint(2, a - 1)
    return (f"{n} had {a} {it} and gave {b} of them to {n2}. How many {it} does {n} have left?",
            _less(n, a, b, it), a - b)


def _mul(r: random.Random, n: str, n2: str, it: str) -> tuple[str, str, int]:
    a, b = r.randint(2, 9), r.randint(2, 9)
    return (f"{n} buys {a} bags of {it}. Each bag holds {b} {it}. How many {it} does {n} buy?",
            _product(f"{n} buys", a, b, it), a * b)


def _div(r: random.Random, n: str, n2: str, it: str) -> tuple[str, str, int]:
    a, b = r.randint(2, 9), r.randint(2, 9)
    return (f"{n} shares {a * b} {it} equally among {b} friends. How many {it} does each friend get?",
            f"Each friend gets {a * b} / {b} = <<{a * b}/{b}={a}>>{a} {it}.", a)


def _mul_sub(r: random.Random, n: str, n2: str, it: str) -> tuple[str, str, int]:
    a, b = r.randint(2, 6), r.randint(2, 6)
    c = r.randint(1, a * b - 1)
    return (f"{n} buys {a} boxes with {b} {it} in each box and gives {c} {it} to {n2}. "
            f"How many {it} does {n} have left?",
            _product(f"{n} buys", a, b, it) + "\n" + _less(n, a * b, c, it), a * b - c)


def _wage(r: random.Random, n: str, n2: str, it: str) -> tuple[str, str, int]:
    a, b = r.randint(2, 9), r.randint(2, 5)
    c = r.randint(1, a * b - 1)
    return (f"{n} earns ${a} per hour and works {b} hours. Then {n} spends ${c}. "
            f"How much money does {n} have left?",
            _product(f"{n} earns", a, b, "dollars") + "\n" + _less(n, a * b, c, "dollars"), a * b - c)


def _times_more(r: random.Random, n: str, n2: str, it: str) -> tuple[str, str, int]:
    a, b = r.randint(2, 9), r.randint(2, 4)
    return (f"{n} has {a} {it}. {n2} has {b} times as many {it} as {n}. "
            f"How many {it} do they have together?",
            _product(f"{n2} has", a, b, it)
            + f"\nTogether they have {a} + {a * b} = <<{a}+{a * b}={a + a * b}>>{a + a * b} {it}.", a + a * b)


TEMPLATES: list[Callable[[random.Random, str, str, str], tuple[str, str, int]]] = [
    _add, _sub, _mul, _div, _mul_sub, _wage, _times_more,
]
KINDS = {t.__name__.lstrip("_"): t for t in TEMPLATES}  # add, sub, mul, div, mul_sub, wage, times_more


def parse_kinds(spec: str) -> list[str]:
    """The kinds named in `synthetic:<kind>,<kind>` (all seven for plain `synthetic`), repeats kept: a kind
    named k times is drawn k times as often. A one-line error otherwise."""
    name, _, kinds = spec.partition(":")
    chosen = [k.strip() for k in kinds.split(",") if k.strip()] if kinds else list(KINDS)
    unknown = [k for k in chosen if k not in KINDS]
    if name != "synthetic" or unknown or not chosen:
        fail(f"--dataset {spec}: synthetic kinds are {', '.join(KINDS)} (e.g. synthetic:add,sub); "
             f"{'unknown: ' + ', '.join(unknown) if unknown else 'name at least one'}")
    return chosen


def _split_of(question: str) -> str:
    digest = int(hashlib.sha1(question.encode()).hexdigest(), 16)
    return "test" if digest % TEST_SHARE == 0 else "train"


def make_problem(r: random.Random, kinds: list[str] | None = None) -> Record:
    """One random problem: a template (of `kinds`, default all), names, an item, and sometimes a
    distractor sentence."""
    n, n2 = r.sample(NAMES, 2)
    it = r.choice(ITEMS)
    template = r.choice(TEMPLATES) if kinds is None else KINDS[r.choice(kinds)]
    question, steps, answer = template(r, n, n2, it)
    if r.random() < 0.5:
        sentences = question.split(". ")
        at = r.randint(0, len(sentences) - 1)
        sentences.insert(at, r.choice(DISTRACTORS).format(n2=n2, d=r.randint(2, 9)).rstrip("."))
        question = ". ".join(sentences)
    return Record(question=question, solution=f"{steps}\n#### {answer}", answer=str(answer))


def make_synthetic(split: str, max_samples: int | None = None, seed: int = 0,
                   kinds: list[str] | None = None) -> list[Record]:
    """`max_samples` (default SIZES[split]) distinct problems of `split` (of `kinds`, default all seven),
    the same for the same seed."""
    if split not in SIZES:
        raise ValueError(f"split must be one of {tuple(SIZES)}, not {split!r}")
    want = SIZES[split] if max_samples is None else max_samples
    r = random.Random(f"synthetic-{seed}")
    seen: set[str] = set()
    records: list[Record] = []
    for _ in range(want * 50):
        if len(records) >= want:
            break
        record = make_problem(r, kinds)
        if record["question"] in seen or _split_of(record["question"]) != split:
            continue
        seen.add(record["question"])
        records.append(record)
    return records
