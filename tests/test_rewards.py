import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import UserError
from rewards import REL_TOLERANCE, answers_match, extract_answer, numeric_reward
from rewards.selftest import CASES
from tests.conftest import ROOT, gsm8k_dir, needs_gsm8k


@pytest.mark.parametrize("completion,gold,want_extract,want_reward", CASES, ids=[repr(c)[:30] for c, *_ in CASES])
def test_hand_written_cases(completion, gold, want_extract, want_reward):
    assert extract_answer(completion) == want_extract
    assert numeric_reward([completion], [gold]) == [want_reward]


def test_last_marker_wins_and_rewards_are_per_item():
    completions = ["#### 3\n#### 4", "#### 4", "4", "#### 4.0000001", "#### 4.01"]
    assert numeric_reward(completions, ["4"] * 5) == [1.0, 1.0, 0.0, 1.0, 0.0]


def test_tolerance_scales_with_magnitude():
    assert answers_match("1000000.5", "1000000")  # within 1e-6 * 1e6 = 1
    assert not answers_match("1000002", "1000000")
    assert answers_match(str(1 + REL_TOLERANCE / 2), "1")
    assert not answers_match(str(1 + 2 * REL_TOLERANCE), "1")


def test_length_mismatch_is_a_programming_error():
    with pytest.raises(ValueError):
        numeric_reward(["#### 1"], ["1", "2"])


def test_self_test_cli_passes():
    result = subprocess.run([sys.executable, "-m", "rewards"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert f"{len(CASES)} passed, 0 failed" in result.stdout


junk = st.one_of(
    st.none(), st.text(), st.binary().map(lambda b: b.decode("latin-1")),
    st.text().map(lambda t: "####" + t), st.lists(st.dictionaries(st.text(), st.text())),
    st.integers(), st.floats(allow_nan=True),
)


@settings(max_examples=400, deadline=None)
@given(completion=junk, gold=junk)
def test_never_raises(completion, gold):
    extracted = extract_answer(completion)
    assert extracted is None or isinstance(extracted, str)
    assert numeric_reward([completion], [gold])[0] in (0.0, 1.0)


def _styles(number: str) -> list[str]:
    """The ways models write a final answer that must all be read back as `number`."""
    negative = number.startswith("-")
    digits = number.lstrip("-")
    integer, _, frac = digits.partition(".")
    with_commas = f"{int(integer):,}" + (f".{frac}" if frac else "")
    sign = "-" if negative else ""
    plain = sign + digits
    styles = [f"#### {plain}", f"####{plain}", f"#### {plain}.", f"#### {plain} dollars", f"#### **{plain}**",
              f"####  \n {plain}\n", f"#### {sign}{with_commas}", f"#### ${plain}" if not negative else f"#### {plain}",
              f"Some reasoning: 2 + 2 = 4.\n#### {plain}", f"#### 0\nwait, recompute\n#### {plain}"]
    if not negative:
        styles.append(f"#### +{plain}")
    if not frac:
        styles.append(f"#### {plain}.00")
    return styles


numbers = st.one_of(
    st.integers(-10**12, 10**12).map(str),
    st.decimals(-10**6, 10**6, places=3, allow_nan=False, allow_infinity=False).map(lambda d: format(d, "f")),
)


@settings(max_examples=300, deadline=None)
@given(number=numbers)
def test_every_accepted_style_reads_back(number):
    value = float(number)
    for text in _styles(number):
        extracted = extract_answer(text)
        assert extracted is not None and math.isclose(float(extracted), value, abs_tol=0), (text, extracted)
        assert numeric_reward([text], [number]) == [1.0], text
    # the ground truth itself may carry commas
    gold_with_commas = f"{int(value):,}" if number.lstrip("-").isdigit() else number
    assert numeric_reward([f"#### {number}"], [gold_with_commas]) == [1.0]


@needs_gsm8k
def test_every_gold_solution_scores_one():
    from data import load_gsm8k

    records = load_gsm8k("train", data_dir=gsm8k_dir()) + load_gsm8k("test", data_dir=gsm8k_dir())
    assert len(records) == 8792
    rewards = numeric_reward([r["solution"] for r in records], [r["answer"] for r in records])
    failures = [r["answer"] for r, x in zip(records, rewards) if x != 1.0]
    assert not failures, failures[:10]
    assert sum("," in r["answer"] for r in records) == 93


@pytest.mark.parametrize("length,want", [(0, 0.0), (448, 0.0), (449, -1 / 64), (480, -0.5), (511, -63 / 64),
                                         (512, -1.0), (600, -1.0)])
def test_overlong_penalty_by_hand_at_the_boundaries(length, want):
    """DAPO's soft punishment with L_max 512 and L_cache 64: 0 up to 448 tokens, (448 - len) / 64 after,
    -1 from the limit on."""
    from rewards.functions import overlong_penalty, soft_overlong_punishment

    assert overlong_penalty(length, 512, 64) == pytest.approx(want)
    assert soft_overlong_punishment(512, 64)(completion_ids=[[0] * length]) == [pytest.approx(want)]


def test_overlong_with_no_cache_punishes_only_the_limit():
    from rewards.functions import overlong_penalty

    assert [overlong_penalty(n, 8, 0) for n in (7, 8, 9)] == [0.0, -1.0, -1.0]


def test_overlong_builtin_takes_the_runs_limit_and_cache():
    from rewards.functions import RewardSettings, named

    [(name, fn)] = named(["overlong"], RewardSettings(max_length=100, overlong_cache=20))
    assert name == "overlong" and fn(completion_ids=[[1] * 80, [1] * 90, [1] * 100]) == [0.0, -0.5, -1.0]


def test_builtins_read_after_the_thinking_when_it_is_on():
    from rewards.functions import RewardSettings, named

    (_, numeric), (_, fmt) = named(["numeric", "format"], RewardSettings(thinking=True))
    cut = "<think>\nmaybe #### 4"
    done = "<think>\nmaybe #### 3\n</think>\n#### 4"
    assert numeric(completions=[cut, done], answer=["4", "4"]) == [0.0, 1.0]
    assert fmt(completions=[cut, done], truncated=[True, False]) == [0.0, 1.0]


def _chat_reward(completions, **kwargs):  # TRL's conversational style
    return [float("####" in c[0]["content"]) for c in completions]


def _text_reward(completions, **kwargs):
    return [float(c.strip().endswith("4")) for c in completions]


def _dict_reward(completions, **kwargs):
    return [float(c["content"] == "4") for c in completions]


@pytest.mark.parametrize("fn,completions,names", [
    (_chat_reward, ["#### 4", "no"], "needs --reward_format messages"),  # TypeError: string indices...
    (_dict_reward, ["#### 4", "no"], "needs --reward_format messages"),
    (_text_reward, [[{"role": "assistant", "content": "#### 4"}]], "needs --reward_format text"),  # AttributeError
    (lambda completions, **kw: [c[0][0]["x"] for c in completions], [[{"content": "4"}]], "--reward_format text"),
])
def test_a_reward_failing_on_the_shape_of_its_input_names_the_other_format(fn, completions, names):
    """One line: the reward, its error, and the --reward_format that hands completions in its shape."""
    from common.errors import UserError
    from rewards.functions import score

    with pytest.raises(UserError, match=r"^reward r raised (TypeError|AttributeError|KeyError|IndexError): ") as err:
        score([("r", fn)], {"completions": completions})
    assert names in str(err.value) and "\n" not in str(err.value)


def test_a_reward_failing_otherwise_gets_no_format_hint():
    from common.errors import UserError
    from rewards.functions import score

    def broken(completions, **kw):
        raise ValueError("my own bug")

    with pytest.raises(UserError, match=r"^reward r raised ValueError: my own bug$"):
        score([("r", broken)], {"completions": ["x"]})
    assert score([("r", _chat_reward)], {"completions": [[{"role": "assistant", "content": "#### 4"}]]}) == {"r": [1.0]}


def test_async_rewards_run_concurrently_within_a_step_in_order():
    """Two `async def` rewards, each waiting 0.3 s per call and finishing their completions in reverse
    order, take ~0.3 s together (not 0.6), and every value lands on its own completion and reward."""
    import asyncio
    import time

    from rewards.functions import score

    async def slow_length(completions, **kwargs):
        async def one(i, c):
            await asyncio.sleep(0.3 - 0.05 * i)  # the last completion finishes first
            return float(len(c))
        return await asyncio.gather(*(one(i, c) for i, c in enumerate(completions)))

    async def slow_first_letter(completions, **kwargs):
        await asyncio.sleep(0.3)
        return [float(ord(c[0])) for c in completions]

    def plain(completions, **kwargs):
        return [1.0] * len(completions)

    completions = ["a", "bb", "ccc"]
    start = time.perf_counter()
    scores = score([("length", slow_length), ("plain", plain), ("letter", slow_first_letter)],
                   {"completions": completions})
    took = time.perf_counter() - start
    assert list(scores) == ["length", "plain", "letter"]
    assert scores == {"length": [1.0, 2.0, 3.0], "plain": [1.0, 1.0, 1.0], "letter": [97.0, 98.0, 99.0]}
    assert 0.3 <= took < 0.55, took

    async def broken(completions, **kwargs):
        raise KeyError("answer")

    with pytest.raises(UserError, match=r"^reward broken raised KeyError: 'answer'; completions reach rewards as text"):
        score([("length", slow_length), ("broken", broken)], {"completions": completions})



def test_math_verify_without_the_package_is_one_line(monkeypatch):
    from rewards.functions import resolve

    monkeypatch.setitem(sys.modules, "math_verify", None)  # as if not installed
    with pytest.raises(UserError, match=r"^--reward math_verify needs the math-verify package: pip install "
                                        r"math-verify$"):
        resolve("math_verify")


# (completion, gold, thinking on, math_verify's reward), hand-checked
LATEX_CASES = [
    (r"so it is $\boxed{\frac{3}{4}}$", r"\frac{3}{4}", False, 1.0),
    (r"so it is $\boxed{\frac{3}{4}}$", "0.75", False, 1.0),
    (r"so it is $\boxed{0.75}$", "3/4", False, 1.0),
    (r"so it is $\boxed{\frac{1}{2}}$", r"\frac{3}{4}", False, 0.0),
    (r"first $\boxed{2}$, then $\boxed{3}$", "3", False, 1.0),  # the last \boxed{}: math-verify reads from the end
    (r"first $\boxed{2}$, then $\boxed{3}$", "2", False, 0.0),
    (r"$\boxed{\sqrt{8}}$", r"2\sqrt{2}", False, 1.0),
    ("the answer is 3/4", r"\frac{3}{4}", False, 0.0),  # no LaTeX anchor: not read (try_extract_without_anchor)
    (r"<think>maybe $\boxed{5}$</think> so $\boxed{6}$", "6", True, 1.0),
    (r"<think>maybe $\boxed{5}$</think> so $\boxed{6}$", "5", True, 0.0),
    (r"<think>maybe $\boxed{5}$ and cut", "5", True, 0.0),  # thinking never closed: no answer
]


@pytest.mark.parametrize("completion,gold,thinking,want", LATEX_CASES)
def test_math_verify_reads_latex_answers_after_the_thinking(completion, gold, thinking, want):
    pytest.importorskip("math_verify")
    from rewards.functions import RewardSettings, resolve

    _, reward = resolve("math_verify", RewardSettings(thinking=thinking))
    assert reward(completions=[completion], answer=[gold]) == [want]


def _trl_accuracy_reward_module(folder) -> str:
    """TRL's accuracy_reward, its module's source copied from the installed trl package (found, not imported)
    into `folder`/trl_accuracy.py; its one relative import (is math_verify there) made local."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("trl")
    if spec is None or spec.origin is None:
        pytest.skip("trl is not installed: nothing to copy its accuracy_reward from")
    source = (Path(spec.origin).parent / "rewards" / "accuracy_rewards.py").read_text()
    relative = "from ..import_utils import is_math_verify_available"
    assert relative in source
    (folder / "trl_accuracy.py").write_text(source.replace(
        relative, "def is_math_verify_available():\n    return True\n"))
    return "trl_accuracy:accuracy_reward"


MATH_ROWS = [  # MATH-style: a problem and a worked solution ending in \boxed{}
    {"problem": f"What is {a}/{b} of 1?",
     "solution": rf"Multiply: $\frac{{{a}}}{{{b}}} \cdot 1 = \boxed{{\frac{{{a}}}{{{b}}}}}$."}
    for a, b in [(1, 2), (3, 4), (2, 3), (5, 6), (1, 7), (3, 8), (4, 9), (7, 10), (1, 3), (5, 8)]
]


def test_trls_accuracy_reward_as_a_module_gives_what_math_verify_gives(tmp_path, monkeypatch):
    """TRL's accuracy_reward through --reward module:function (its `solution` column, chat-message
    completions) and --reward math_verify (the `\\boxed{}` answer the data loader read) agree on each
    completion of a hand-made set over MATH-style records."""
    pytest.importorskip("math_verify")

    from data.tables import Fields, to_records
    from rewards.functions import named, score

    monkeypatch.chdir(tmp_path)
    spec = _trl_accuracy_reward_module(tmp_path)
    records = to_records(MATH_ROWS, Fields("problem", "solution", "solution", latex=True), "math.jsonl")
    assert records[0]["answer"] == r"\frac{1}{2}" and records[0]["solution"] == MATH_ROWS[0]["solution"]
    texts = [r"$\boxed{\frac{1}{2}}$", r"$\boxed{0.5}$", r"$\boxed{\frac{2}{4}}$", r"$\boxed{\frac{1}{3}}$", "1/2",
             r"it is $\frac{1}{2}$", r"$\boxed{\frac{3}{4}}$", r"\boxed{1/2}", "", r"$\boxed{}$"]
    rows = [records[0]] * len(texts) + [records[1]] * len(texts)
    kwargs = {"completions": [[{"role": "assistant", "content": t}] for t in texts * 2],
              "answer": [r["answer"] for r in rows], "solution": [r["solution"] for r in rows]}
    scores = score(named([spec, "math_verify"]), kwargs)
    assert scores["accuracy_reward"] == scores["math_verify"]
    assert scores["math_verify"][:3] == [1.0, 1.0, 1.0] and scores["math_verify"][10 + 6] == 1.0
    assert 0 < sum(scores["math_verify"]) < len(rows)  # both values occur: the comparison can fail


def test_a_math_style_jsonl_trains_two_steps_on_tiny_with_math_verify(tmp_path, monkeypatch):
    """\\boxed{} gold is accepted with --reward math_verify (and refused without it, in one line)."""
    pytest.importorskip("math_verify")
    import json

    import train_grpo

    monkeypatch.chdir(tmp_path)
    (tmp_path / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MATH_ROWS))
    flags = ["--model_name", "tiny", "--dataset", str(tmp_path / "math.jsonl"), "--question_field", "problem",
             "--answer_field", "solution", "--solution_field", "solution", "--max_steps", "2", "--prompts_per_step",
             "2", "--max_completion_length", "8", "--device", "cpu", "--no_progress"]
    with pytest.raises(UserError, match=r"is not a number .*LaTeX answers .* with --reward math_verify"):
        train_grpo.main(flags + ["--grpo_output", str(tmp_path / "refused")])
    train_grpo.main(flags + ["--grpo_output", str(tmp_path / "g"), "--reward", "math_verify", "--reward", "format"])
    log = [json.loads(x) for x in (tmp_path / "g" / "grpo_training_logs.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2] and all("reward_math_verify_mean" in x for x in log)
