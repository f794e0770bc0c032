import json
import subprocess
import sys
from math import comb

import pytest

from eval.metrics import majority_correct, pass_at_k, summarize
from tests.conftest import ROOT


def scored(correct, extracted="1", truncated=False, num_tokens=10):
    return {"correct": correct, "extracted": extracted, "truncated": truncated, "num_tokens": num_tokens}


def test_pass_at_k_unbiased_estimator_by_hand():
    # n=4, c=1: pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 1/2; pass@4 = 1
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - comb(7, 5) / comb(10, 5))
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_majority_vote():
    assert majority_correct(["3", "3", "4", None], "3")
    assert not majority_correct(["4", "3", "4"], "3")
    assert majority_correct(["3.0", "3", "1,000"], "3")  # numeric, not textual, votes
    assert not majority_correct([None, None], "3")


def test_summary_on_fixed_completions():
    groups = [
        [scored(True), scored(False, extracted=None, truncated=True, num_tokens=20)],
        [scored(False, extracted="7"), scored(False, extracted="7")],
    ]
    s = summarize(groups, ["1", "2"])
    assert s["accuracy"] == 0.25
    assert s["format_rate"] == 0.75 and s["answer_rate"] == 0.75 and s["truncation_rate"] == 0.25
    assert s["mean_completion_tokens"] == 12.5
    assert s["pass@1"] == 0.25 and s["pass@2"] == 0.5  # question 1: 1 of 2 right
    assert s["maj@2"] == 0.5


def test_evaluate_scores_fixed_completions(monkeypatch, tiny_model, tiny_tokenizer):
    """evaluate() with sampling replaced by known completions: accuracy is computed right."""
    import eval.evaluate as ev
    from data import make_synthetic
    from sampling import Completions, Sampler, SamplingParams

    records = make_synthetic("test", max_samples=4)
    texts = [f"so\n#### {records[0]['answer']}", "#### 99999", f"#### {records[2]['answer']}", "no answer"]

    def fake_sample(prompts, params, **kwargs):
        assert params == SamplingParams(max_new_tokens=7)
        ids = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id] for t in texts]
        ids[3] = ids[3][:-1]  # cut at the limit: no eos
        return Completions(list(range(4)), ids, [False, False, False, True])

    sampler = Sampler(tiny_model, eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
    monkeypatch.setattr(sampler, "sample", fake_sample)
    summary, predictions = ev.evaluate(sampler, tiny_tokenizer, records, SamplingParams(max_new_tokens=7),
                                       show_progress=False)
    assert summary["max_new_tokens"] == 7 and summary["temperature"] == 0.0
    assert summary["accuracy"] == 0.5 and summary["truncation_rate"] == 0.25 and summary["format_rate"] == 0.75
    assert [p["correct"] for p in predictions] == [True, False, True, False]
    assert predictions[1]["extracted"] == "99999" and predictions[0]["gold"] == records[0]["answer"]


def test_eval_cli_end_to_end(tmp_path):
    out = tmp_path / "ev"
    result = subprocess.run([sys.executable, "-m", "eval", "--model", "tiny", "--dataset", "synthetic",
                             "--max_samples", "4", "--max_new_tokens", "8", "--num_samples", "2", "--temperature",
                             "1.0", "--output", str(out), "--no_progress"],
                            cwd=ROOT, capture_output=True, text=True, env={**__import__("os").environ})
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "eval_summary.json").read_text())
    for key in ("accuracy", "format_rate", "truncation_rate", "mean_completion_tokens", "tokens_per_s",
                "wall_time_s", "pass@1", "pass@2", "maj@2"):
        assert key in summary, key
    lines = (out / "eval_predictions.jsonl").read_text().splitlines()
    assert len(lines) == 8
    assert set(json.loads(lines[0])) >= {"question", "gold", "completion", "extracted", "correct"}


def test_eval_cli_rejects_greedy_samples(tmp_path):
    result = subprocess.run([sys.executable, "-m", "eval", "--model", "tiny", "--num_samples", "4"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--temperature" in result.stderr and "Traceback" not in result.stderr


def test_eval_cli_rejects_cuda_graphs_off_cuda(tmp_path):
    result = subprocess.run([sys.executable, "-m", "eval", "--model", "tiny", "--dataset", "synthetic",
                             "--device", "cpu", "--cuda_graphs"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: --cuda_graphs on needs a CUDA device")
    assert result.stderr.count("\n") == 1


# lm-evaluation-harness's gsm8k rules against ours, form by form (docs/eval.md), hand-checked:
# (completion, gold, numeric strict, harness strict, numeric flexible, harness flexible)
HARNESS_FORMS = [
    ("so 72\n#### 72", "72", True, True, True, True),
    ("#### 72.0", "72", True, False, True, False),  # the harness compares strings
    ("#### $1,080", "1,080", True, False, True, True),  # strict wants a digit after '#### '; flexible drops $ ,
    ("####12", "12", True, False, True, True),  # strict wants a space after the marker
    ("#### 0.5", ".5", True, False, True, False),
    ("#### 5\nno wait\n#### 7", "5", False, True, False, False),  # the harness takes the first '####', we the last
    ("#### 5\nno wait\n#### 7", "7", True, False, True, True),
    ("#### 1,080.", "1080", True, True, True, True),  # both drop commas and a final period
    ("#### 3/4", "0.75", True, False, False, False),  # an exact fraction is ours alone (flexible reads the 4)
    ("The answer is 42.", "42", False, False, True, True),
]


@pytest.mark.parametrize("completion,gold,ours,theirs,ours_flex,theirs_flex", HARNESS_FORMS)
def test_scoring_harness_reads_each_form_as_lm_evaluation_harness_does(completion, gold, ours, theirs, ours_flex,
                                                                       theirs_flex):
    from eval.evaluate import score_answer

    numeric, harness = score_answer(completion, gold), score_answer(completion, gold, "harness")
    assert (numeric["correct"], harness["correct"]) == (ours, theirs)
    assert (numeric["correct_flexible"], harness["correct_flexible"]) == (ours_flex, theirs_flex)
