"""Eval on the field's yardstick: flexible extraction, few-shot prompts, the paired comparison."""

import json
import subprocess
import sys

import pytest

from common.errors import UserError
from eval.compare import bootstrap_ci, compare, mcnemar_p, read_correct
from rewards import answers_match, extract_last_number
from tests.conftest import ROOT


@pytest.mark.parametrize("text,want", [
    ("so she has 18 eggs.", "18"),
    ("#### 18", "18"),
    ("It costs $1,080.", "1080"),
    ("first 3, then 4.5 and finally -7", "-7"),
    ("Answer: 12\n\nCheck: 5 + 7", "7"),  # the last number, whatever it is
    ("The answer is 0.5.", "0.5"),
    ("no numbers here", None),
    ("", None),
    (None, None),
    ("...", None),
])
def test_flexible_extraction_takes_the_last_number(text, want):
    assert extract_last_number(text) == want


def test_flexible_and_strict_scores_differ_as_published():
    completion = "She pays 3 * 6 = 18 dollars."  # no '####': strict misses it, flexible finds it
    assert extract_last_number(completion) == "18" and answers_match(extract_last_number(completion), "18")


def test_mcnemar_exact_p_by_hand():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 0) == pytest.approx(2 / 32)  # 2 * P(X <= 0), X ~ Bin(5, 1/2)
    assert mcnemar_p(1, 4) == pytest.approx(2 * 6 / 32)  # 2 * (1 + 5) / 32
    assert mcnemar_p(3, 3) == 1.0
    assert mcnemar_p(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)


def test_paired_bootstrap_by_hand():
    same = [True, False, True, True]
    assert bootstrap_ci(same, same) == (0.0, 0.0)  # identical answers: no difference in any resample
    a, b = [False] * 10, [True] * 10  # every problem fixed: every resample gives +1
    assert bootstrap_ci(a, b) == (1.0, 1.0)
    a, b = [False] * 50 + [True] * 50, [True] * 50 + [False] * 50  # 50 fixed, 50 broken: centred on 0
    low, high = bootstrap_ci(a, b)
    assert -0.25 < low < -0.1 and 0.1 < high < 0.25  # +-1.96 * sqrt(1/100) = +-0.196


def test_compare_counts_fixed_and_broken_and_refuses_other_problems():
    a = {("q1", "1"): True, ("q2", "2"): False, ("q3", "3"): False, ("q4", "4"): True}
    b = {("q2", "2"): True, ("q1", "1"): True, ("q3", "3"): True, ("q4", "4"): False}
    result = compare(a, b, resamples=2000)
    assert result["accuracy_a"] == 0.5 and result["accuracy_b"] == 0.75 and result["difference"] == 0.25
    assert result["fixed"] == 2 and result["broken"] == 1 and result["problems"] == 4
    assert result["mcnemar_p"] == pytest.approx(1.0)
    with pytest.raises(UserError, match="different problems: 1 only in A, 0 only in B"):
        compare({**a, ("q5", "5"): True}, b)


def _predictions(folder, rows):
    folder.mkdir(parents=True)
    (folder / "eval_predictions.jsonl").write_text("".join(
        json.dumps({"question": q, "gold": g, "completion": "", "correct": c, "correct_flexible": c}) + "\n"
        for q, g, c in rows))
    return folder


def test_compare_cli_prints_a_table_and_one_json_line(tmp_path):
    a = _predictions(tmp_path / "a", [(f"q{i}", str(i), i % 2 == 0) for i in range(40)])
    b = _predictions(tmp_path / "b", [(f"q{i}", str(i), i % 2 == 0 or i < 20) for i in range(40)])
    result = subprocess.run([sys.executable, "-m", "eval.compare", str(a), str(b)], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    record = json.loads(lines[-1].removeprefix("JSON "))
    assert set(record) >= {"accuracy_a", "accuracy_b", "difference", "ci95", "mcnemar_p", "fixed", "broken"}
    assert record["fixed"] == 10 and record["broken"] == 0 and record["difference"] == pytest.approx(0.25)
    assert record["mcnemar_p"] == pytest.approx(2 / 1024) and record["ci95"][0] > 0
    assert "McNemar" in result.stdout and "fixed 10" in result.stdout
    other = _predictions(tmp_path / "c", [("another", "1", True)])
    bad = subprocess.run([sys.executable, "-m", "eval.compare", str(a), str(other)], cwd=ROOT, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "different problems" in bad.stderr
    with pytest.raises(UserError, match="not found"):
        read_correct(tmp_path / "missing")


def test_few_shot_prompt_layout(tiny_tokenizer):
    from data.prompt import INSTRUCTION, encode_prompt, render_prompt

    shots = [("Ann has 2 apples. How many?", "She has 2.\n#### 2"), ("Bo has 3. How many?", "#### 3")]
    text = render_prompt(tiny_tokenizer, "Cy has 4. How many?", shots)
    messages = [{"role": "user", "content": f"Ann has 2 apples. How many?\n{INSTRUCTION}"},
                {"role": "assistant", "content": "She has 2.\n#### 2"},
                {"role": "user", "content": f"Bo has 3. How many?\n{INSTRUCTION}"},
                {"role": "assistant", "content": "#### 3"},
                {"role": "user", "content": f"Cy has 4. How many?\n{INSTRUCTION}"}]
    assert text == tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                      enable_thinking=False)
    assert text.index("#### 2") < text.index("#### 3") < text.index("Cy has 4")
    assert text.endswith(render_prompt(tiny_tokenizer, "Cy has 4. How many?").split("<|im_start|>user")[-1])
    assert len(encode_prompt(tiny_tokenizer, "Cy has 4.", shots)) > len(encode_prompt(tiny_tokenizer, "Cy has 4."))


def test_eval_cli_reports_both_scores_and_names_its_few_shot_examples(tmp_path):
    out = tmp_path / "ev"
    result = subprocess.run([sys.executable, "-m", "eval", "--model", "tiny", "--dataset", "synthetic",
                             "--max_samples", "6", "--max_new_tokens", "8", "--num_fewshot", "2", "--output", str(out),
                             "--device", "cpu", "--no_progress"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "eval_summary.json").read_text())
    assert summary["num_fewshot"] == 2 and len(summary["fewshot_train_indices"]) == 2
    assert 0 <= summary["accuracy_flexible"] <= 1 and summary["continuous_batching"] is True
    first = json.loads((out / "eval_predictions.jsonl").read_text().splitlines()[0])
    assert {"correct", "correct_flexible", "extracted_flexible"} <= set(first)
