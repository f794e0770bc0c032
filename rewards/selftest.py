"""Hand-written reward cases: `python -m rewards` prints them as a table, the tests run them too."""

from __future__ import annotations

from rewards.numeric import extract_answer, numeric_reward

# (completion, ground truth, expected extract_answer, expected reward)
CASES: list[tuple[object, object, str | None, float]] = [
    ("so the total is 72.\n#### 72", "72", "72", 1.0),
    ("#### 1,080", "1080", "1080", 1.0),
    ("#### 1080", "1,080", "1080", 1.0),
    ("#### $18", "18", "18", 1.0),
    ("####18", "18", "18", 1.0),
    ("#### 18.", "18", "18", 1.0),
    ("#### 18.00", "18", "18.00", 1.0),
    ("#### 18.5", "18", "18.5", 0.0),
    ("#### -5", "-5", "-5", 1.0),
    ("#### +5", "5", "5", 1.0),
    ("#### -5", "5", "-5", 0.0),
    ("#### 18 dollars", "18", "18", 1.0),
    ("#### **18**", "18", "18", 1.0),
    ("####   \n\n  42\n", "42", "42", 1.0),
    ("#### 0.5", ".5", "0.5", 1.0),
    ("first #### 3, then #### 4", "4", "4", 1.0),
    ("first #### 4, then #### 3", "4", "3", 0.0),
    ("The answer is 42.", "42", None, 0.0),
    ("", "42", None, 0.0),
    (None, "42", None, 0.0),
    ("####", "42", None, 0.0),
    ("#### the answer", "42", None, 0.0),
    ("#### nan", "nan", None, 0.0),
    ("#### inf", "inf", None, 0.0),
    ("#### 1e400", "1", None, 0.0),
    ("#### " + "9" * 400, "9" * 400, None, 0.0),
    ("#### " + "9" * 200, "9" * 200, "9" * 200, 1.0),  # long, but finite and equal
    ("#### \u0664\u0662", "42", None, 0.0),
    ("#### 42", "\u0664\u0662", "42", 0.0),
    ("x" * 100_000 + "#### 7", "7", "7", 1.0),
    ("#" * 100_000, "7", None, 0.0),
    ([{"role": "assistant", "content": "4 + 3 = 7\n#### 7"}], "7", "7", 1.0),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "#### 8"}], "7", "8", 0.0),
    # fractions and mixed numbers, exactly: 3/4 is 0.75 (never 3), 2 1/2 is 2.5
    ("#### 3/4", "3/4", "3/4", 1.0),
    ("#### 3/4", "0.75", "3/4", 1.0),
    ("#### 0.75", "3/4", "0.75", 1.0),
    ("#### 3", "3/4", "3", 0.0),
    ("#### 3/4", "3", "3/4", 0.0),
    ("#### 6/8", "3/4", "6/8", 1.0),
    ("#### 3 / 4", "3/4", "3/4", 1.0),
    ("#### -3/4", "-0.75", "-3/4", 1.0),
    ("#### 2 1/2", "2.5", "2 1/2", 1.0),
    ("#### 2 1/2", "2", "2 1/2", 0.0),
    ("#### -2 1/2", "-2.5", "-2 1/2", 1.0),
    ("#### 2 1/2 cups", "5/2", "2 1/2", 1.0),
    ("#### 1/3", "1/3", "1/3", 1.0),
    ("#### 0.33", "1/3", "0.33", 0.0),
    ("#### 3/hour", "3", "3", 1.0),
    # forms that are not one exact number: no answer (and refused as gold)
    ("#### 1/2/3", "0.5", None, 0.0),
    ("#### 10/12/2020", "10", None, 0.0),
    ("#### 3/0", "3", None, 0.0),
    ("#### 1.5/2", "0.75", None, 0.0),
    ("#### 1,080/2", "540", None, 0.0),
    ("#### 2 3/2", "3.5", None, 0.0),
    ("#### 3/4.5", "0.75", None, 0.0),
]


def run() -> int:
    """Print a table of every case; return the number of failures."""
    failures = 0
    print(f"{'completion':<40} {'gold':>8} {'extracted':>10} {'reward':>6}  ok")
    for completion, gold, want_extract, want_reward in CASES:
        got_extract = extract_answer(completion)
        got_reward = numeric_reward([completion], [gold])[0]
        ok = got_extract == want_extract and got_reward == want_reward
        failures += not ok
        shown = repr(completion)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        gold_shown = repr(gold) if len(repr(gold)) <= 8 else repr(gold)[:5] + "..."
        extract_shown = str(got_extract) if len(str(got_extract)) <= 10 else str(got_extract)[:7] + "..."
        print(f"{shown:<40} {gold_shown:>8} {extract_shown:>10} {got_reward:>6.1f}  {'ok' if ok else 'FAIL'}")
    print(f"{len(CASES) - failures} passed, {failures} failed")
    return failures
