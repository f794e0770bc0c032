"""Your own problems and rewards: data files and folders, answer-only data, reward functions, the API."""

import csv
import json
import subprocess
import sys

import pytest

from common.errors import UserError
from data import Fields, load_records
from tests.conftest import ROOT

QUESTIONS = [("Tom has {a} apples and buys {b} more. How many apples does he have?", lambda a, b: a + b),
             ("A box holds {a} pens. {b} are taken out. How many pens are left?", lambda a, b: a - b)]


def _rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        text, fn = QUESTIONS[i % 2]
        a, b = 10 + i, 1 + i % 7
        rows.append({"problem": text.format(a=a, b=b), "target": fn(a, b), "level": i % 3})
    return rows


def _csv(path, rows):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


FIELDS = ["--question_field", "problem", "--answer_field", "target", "--solution_field", "none"]


def test_every_file_type_and_a_folder_load_the_same_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows(20)
    _csv(tmp_path / "p.csv", rows)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    folder = tmp_path / "folder"
    folder.mkdir()
    _csv(folder / "train.csv", rows[:15])
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[15:]))
    fields = Fields("problem", "target", "none")
    want = [(r["problem"], str(r["target"])) for r in rows]
    for name in ("p.csv", "p.jsonl", "p.json", "p.parquet"):
        train = load_records(str(tmp_path / name), "train", fields=fields)
        test = load_records(str(tmp_path / name), "test", fields=fields)
        assert len(test) == 2 and len(train) == 18  # a seeded 10% held out
        assert sorted((r["question"], r["answer"]) for r in train + test) == sorted(want)
        assert {r["question"] for r in train}.isdisjoint(r["question"] for r in test)
        assert all(r["solution"] is None and "level" in r["columns"] for r in train)
    test = load_records(str(folder), "test", fields=fields)
    assert [r["question"] for r in test] == [r["problem"] for r in rows[15:]]
    assert len(load_records(str(folder), "train", fields=fields, max_samples=4)) == 4


def test_the_held_out_share_is_the_same_whatever_the_seed_and_is_said(tmp_path, capsys):
    import data.tables

    path = _csv(tmp_path / "p.csv", _rows(30))
    data.tables._said.discard(str(path))
    fields = Fields("problem", "target", "none")
    first = load_records(str(path), "test", seed=1, fields=fields)
    again = load_records(str(path), "test", seed=99, fields=fields)
    assert first == again and len(first) == 3
    printed = capsys.readouterr().out
    assert printed.count("held out as the test split") == 1 and "3 of its 30 rows" in printed


def test_gsm8k_style_solutions_give_answer_and_solution(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "One and one.\n#### 2"}) + "\n"
                    + json.dumps({"question": "2+3?", "answer": "#### 5", "source": "x"}) + "\n")
    records = load_records(str(path), "train")
    assert records == [{"question": "1+1?", "answer": "2", "solution": "One and one.\n#### 2", "columns": {}}]


@pytest.mark.parametrize("content,says", [
    ("problem,answer\nHow many?,3\n", "row 1 has no column 'target' (it has problem, answer); name the column with "
                                      "--answer_field"),
    ("problem,target\nHow many?,three\n", "row 1, column 'target': 'three' is not a number"),
    ("problem,target\nHow many?,3\nAnd now?,\n", "row 2, column 'target': '' is not a number"),
    ("problem,target\n", "holds no rows"),
    ("problem,target\n,3\n", "row 1, column 'problem': the question is empty"),
])
def test_malformed_data_is_one_line_naming_file_row_and_column(tmp_path, content, says):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(UserError) as info:
        load_records(str(path), "train", fields=Fields("problem", "target", "none"))
    assert str(info.value).startswith(str(path)) and says in str(info.value) and "\n" not in str(info.value)


def test_a_gold_answer_that_is_not_a_number_is_one_line_in_every_data_form(tmp_path):
    """`#### abc` would score every completion 0 and train on nothing: GSM8K's files, a data file of any
    form and rows handed to the API all refuse it the same way."""
    from data import as_records, load_gsm8k

    bad = {"question": "How many?", "answer": "Some work.\n#### abc"}
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + json.dumps(bad))
    with pytest.raises(UserError, match=r"train\.jsonl:2: bad GSM8K line \(the solution's '####' is followed by "
                                        r"'abc', not a number; numbers are"):
        load_gsm8k("train", data_dir=str(tmp_path))
    (tmp_path / "own.csv").write_text("question,answer\nHow many?,\"work\n#### abc\"\n")
    with pytest.raises(UserError, match=r"own\.csv: row 1, column 'answer': the solution's '####' is followed by "
                                        r"'abc', not a number"):
        load_records(str(tmp_path / "own.csv"), "train")
    with pytest.raises(UserError, match=r"train_records: row 1, column 'answer': .*'abc', not a number"):
        as_records([bad], Fields(), "train_records")


def test_sft_on_answer_only_data_says_it_needs_solutions(tmp_path):
    path = _csv(tmp_path / "p.csv", _rows(10))
    result = subprocess.run([sys.executable, "train_sft.py", "--model_name", "tiny", "--dataset", str(path), *FIELDS,
                             "--sft_output", str(tmp_path / "sft"), "--device", "cpu"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: SFT needs worked solutions") and "--solution_field" in result.stderr


@pytest.mark.slow  # the quick suite stays under 5 minutes; CI runs it
def test_an_answer_only_csv_trains_two_grpo_steps_and_evaluates_with_a_clean_log(tmp_path):
    path = _csv(tmp_path / "p.csv", _rows(40))
    out = tmp_path / "grpo"
    result = subprocess.run([sys.executable, "train_grpo.py", "--model_name", "tiny", "--dataset", str(path), *FIELDS,
                             "--grpo_output", str(out), "--max_steps", "2", "--prompts_per_step", "2",
                             "--max_completion_length", "8", "--reward", "numeric", "--reward", "format",
                             "--reward_weights", "1.0", "0.1", "--eval_every", "2", "--eval_samples", "4",
                             "--device", "cpu", "--finetune", "lora"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    # a log, not a terminal: no carriage-return bars (ours, the hub's, transformers') and no FutureWarning
    assert "\r" not in result.stdout + result.stderr and "Warning" not in result.stderr, result.stderr[-2000:]
    assert "held out as the test split" in result.stdout
    log = [json.loads(x) for x in (out / "grpo_training_logs.jsonl").read_text().splitlines()]
    last = log[-1]
    for key in ("reward_numeric_mean", "reward_numeric_std", "reward_format_mean", "reward_format_std",
                "reward_time_s", "eval_accuracy"):
        assert key in last, key
    assert last["reward_mean"] == pytest.approx(last["reward_numeric_mean"] + 0.1 * last["reward_format_mean"])
    ev = subprocess.run([sys.executable, "-m", "eval", "--model", str(out), "--dataset", str(path), *FIELDS,
                         "--max_new_tokens", "8", "--device", "cpu"], cwd=ROOT,
                        capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert "\r" not in ev.stdout + ev.stderr and "Loading weights" not in ev.stderr
    assert json.loads((out / "eval" / "eval_summary.json").read_text())["num_questions"] == 4


def test_a_custom_reward_module_gets_every_column_under_its_dataset_name(tmp_path, monkeypatch):
    from grpo.trainer import GRPOConfig, train_grpo

    seen = tmp_path / "seen.json"
    (tmp_path / "my_rewards.py").write_text(f'''
import json

def by_level(completions, answer, level, truncated, target, problem, question, **columns):
    json.dump({{"n": len(completions), "answer": answer, "level": level, "truncated": truncated,
               "target": target, "same_question": problem == question, "others": sorted(columns)}},
              open({str(seen)!r}, "w"))
    return [0.5 * float(lv) for lv in level]
''')
    monkeypatch.chdir(tmp_path)
    path = _csv(tmp_path / "p.csv", _rows(20))
    cfg = GRPOConfig(model_name="tiny", dataset=str(path), question_field="problem", answer_field="target",
                     solution_field="none", grpo_output=str(tmp_path / "out"), max_steps=1, prompts_per_step=2,
                     num_generations=2, max_completion_length=6, device="cpu", show_progress=False,
                     reward=("my_rewards:by_level",))
    record = train_grpo(cfg)
    got = json.loads(seen.read_text())
    train = load_records(str(path), "train", fields=cfg.fields())
    assert got["n"] == 4 and len(got["level"]) == 4 and got["level"][0] == got["level"][1]  # a group's rows
    assert set(got["level"]) <= {"0", "1", "2"} and set(got["answer"]) <= {r["answer"] for r in train}
    assert len(got["truncated"]) == 4
    assert got["target"] == got["answer"] and got["same_question"]  # the columns under their own names too
    assert got["others"] == ["completion_ids", "prompts", "solution", "trainer_state"]
    assert "reward_by_level_mean" in record


def _raises(completions, answer, **columns):
    raise RuntimeError("boom")


BROKEN = [
    (_raises, "reward bad raised RuntimeError: boom"),
    (lambda completions, answer, **columns: [1.0], "reward bad returned 1 values for 4 completions"),
    (lambda completions, answer, **columns: [float("nan")] * len(completions),
     "reward bad returned a non-finite value (nan)"),
    (lambda completions, answer, **columns: None, "reward bad must return a list of numbers (or None)"),
]


@pytest.mark.parametrize("fn,says", BROKEN, ids=["raises", "length", "nan", "none"])
def test_a_broken_reward_stops_the_run_in_one_line(tmp_path, fn, says):
    import re

    from grpo.trainer import GRPOConfig, train_grpo

    fn.__name__ = "bad"
    with pytest.raises(UserError, match=re.escape(says)):
        train_grpo(GRPOConfig(model_name="tiny", dataset="synthetic", grpo_output=str(tmp_path / "o"), max_steps=1,
                              prompts_per_step=2, num_generations=2, max_completion_length=4, device="cpu",
                              show_progress=False), reward_funcs=[fn])


def test_reward_specs_and_weights_are_checked_before_training(tmp_path):
    from grpo.trainer import GRPOConfig, train_grpo

    base = dict(model_name="tiny", dataset="synthetic", grpo_output=str(tmp_path / "o"), max_steps=1, device="cpu")
    with pytest.raises(UserError, match="not a built-in"):
        train_grpo(GRPOConfig(**base, reward=("speed",)))
    with pytest.raises(UserError, match="cannot import no_such_module"):
        train_grpo(GRPOConfig(**base, reward=("no_such_module:f",)))
    with pytest.raises(UserError, match="2 --reward_weights for 1 reward"):
        train_grpo(GRPOConfig(**base, reward_weights=(1.0, 2.0)))
    assert not (tmp_path / "o").exists()


def test_rewards_png_shows_each_reward(tmp_path):
    from viz.plots import reward_names, visualize

    log = tmp_path / "grpo_training_logs.jsonl"
    fields = dict(grpo_loss=0.0, policy_loss=0.0, kl_loss=0.0, grad_norm=1.0, learning_rate=1e-6, reward_std=0.1,
                  adv_mean=0.0, adv_std=1.0, time_per_step_s=1.0, generation_time_s=0.5, backward_time_s=0.3,
                  other_time_s=0.2, tokens_generated=100, completion_len_mean=10.0)
    lines = [dict(fields, step=s, reward_mean=0.1 * s + 0.05, reward_numeric_mean=0.1 * s, reward_numeric_std=0.1,
                  reward_format_mean=0.5, reward_format_std=0.1) for s in range(1, 6)]
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert reward_names(lines) == ["numeric", "format"]
    visualize(str(log), str(tmp_path / "plots"))
    assert (tmp_path / "plots" / "rewards.png").stat().st_size > 10_000


def test_run_training_takes_your_data_from_the_environment(tmp_path):
    path = _csv(tmp_path / "p.csv", _rows(10))
    env = {**__import__("os").environ, "DATASET": str(path), "QUESTION_FIELD": "problem", "ANSWER_FIELD": "target",
           "SOLUTION_FIELD": "none", "OUT": str(tmp_path / "out")}
    result = subprocess.run(["./run_training.sh", "--tiny", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                            env=env)
    assert result.returncode == 1 and "error: SFT needs worked solutions" in result.stderr
    assert "stage 'sft' failed" in result.stderr and f"--dataset {path}" in result.stdout


def test_the_readme_python_api_example_runs(tmp_path):
    """The README's example (custom data + a custom reward), as printed there, run in a fresh folder."""
    readme = (ROOT / "README.md").read_text()
    code = readme.split("<!-- api-example -->\n```python\n", 1)[1].split("```", 1)[0]
    assert 10 <= len(code.strip().splitlines()) <= 15
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("reward_numeric_mean") and "reward_short_mean" in last and "eval_accuracy" in last
    assert (tmp_path / "runs" / "api_example" / "model.safetensors").is_file()


# Rewards written as TRL's docs and the Unsloth Qwen3 GRPO notebook write them (TRL itself is not imported).
def reward_len(completions, **kwargs):  # TRL's docs: standard format
    return [-abs(20 - len(completion)) for completion in completions]


def format_reward_func(completions, **kwargs):  # TRL's docs: conversational format
    import re

    return [1.0 if re.search(r"####", c[0]["content"]) else 0.0 for c in completions]


def correctness_reward_func(prompts, completions, answer, **kwargs):  # Unsloth: prompts first, messages
    responses = [completion[0]["content"] for completion in completions]
    assert prompts[0][-1]["role"] == "user" and isinstance(prompts[0][-1]["content"], str)
    return [2.0 if r.strip().endswith(f"#### {a}") else 0.0 for r, a in zip(responses, answer)]


def scheduled(completions, trainer_state, completion_ids, **kwargs):  # TRL's trainer_state, completion_ids
    return [trainer_state.global_step / trainer_state.max_steps - len(ids) / 100 for ids in completion_ids]


def math_only(completions, task, answer, **kwargs):  # multi-task data: None where it does not apply
    return [None if t != "math" else float(c[0]["content"].endswith(f"#### {a}"))
            for c, t, a in zip(completions, task, answer)]


def count_only(completions, task, **kwargs):
    return [None if t != "count" else float(len(c[0]["content"]) < 12) for c, t in zip(completions, task)]


def _fixed_rollouts(tokenizer, texts):
    """Each prompt's group gets these completion texts, finished with the end-of-turn token."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    return lambda step, prompts, answers: [list(i) for _ in prompts for i in ids]


def test_trl_style_rewards_get_what_trl_passes(tmp_path, tiny_tokenizer):
    """Rewards from TRL's docs and Unsloth's notebook run unchanged with --reward_format messages: the logged
    means equal the values computed by hand on the fixed completions; trainer_state counts the steps."""
    from grpo.trainer import LOG_NAME, GRPOConfig, train_grpo

    rows = [{"question": f"What is {a} + 1?", "answer": a + 1} for a in range(8)]
    texts = ["It is #### 0", "no idea, sorry, none at all"]
    cfg = GRPOConfig(model_name="tiny", grpo_output=str(tmp_path / "o"), max_steps=2, prompts_per_step=2,
                     num_generations=2, max_completion_length=16, device="cpu", show_progress=False, beta=0.0,
                     reward_format="messages")
    train_grpo(cfg, reward_funcs=[format_reward_func, correctness_reward_func, scheduled], train_records=rows,
               eval_records=rows, rollout=_fixed_rollouts(tiny_tokenizer, texts))
    log = [json.loads(x) for x in (tmp_path / "o" / LOG_NAME).read_text().splitlines()]
    assert [x["reward_format_reward_func_mean"] for x in log] == [0.5, 0.5]
    assert [x["reward_correctness_reward_func_mean"] for x in log] == [0.0, 0.0]  # no answer is 0 here
    lengths = [len(tiny_tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts]
    for step, x in enumerate(log):
        assert x["reward_scheduled_mean"] == pytest.approx(step / 2 - sum(lengths) / 2 / 100)
    cfg.reward_format, cfg.grpo_output = "text", str(tmp_path / "t")
    train_grpo(cfg, reward_funcs=[reward_len], train_records=rows, eval_records=rows,
               rollout=_fixed_rollouts(tiny_tokenizer, texts))
    line = json.loads((tmp_path / "t" / LOG_NAME).read_text().splitlines()[0])
    assert line["reward_reward_len_mean"] == pytest.approx(sum(-abs(20 - len(t)) for t in texts) / 2)


def test_none_rewards_skip_rows_of_other_tasks(tmp_path, tiny_tokenizer):
    """Two tasks, one reward each returning None for the other's rows: each mean is over its own rows,
    the advantage's sum skips the Nones; a row that no reward scores is one line."""
    from grpo.trainer import LOG_NAME, GRPOConfig, train_grpo

    rows = [{"question": f"Task {i}: what is {i} + 1?", "answer": i + 1, "task": "math" if i % 2 else "count"}
            for i in range(8)]
    cfg = GRPOConfig(model_name="tiny", grpo_output=str(tmp_path / "o"), max_steps=1, prompts_per_step=8,
                     num_generations=2, max_completion_length=16, device="cpu", show_progress=False, beta=0.0,
                     reward_format="messages", seed=5)
    texts = ["short", "a much longer completion"]
    train_grpo(cfg, reward_funcs=[math_only, count_only], train_records=rows, eval_records=rows,
               rollout=_fixed_rollouts(tiny_tokenizer, texts))
    line = json.loads((tmp_path / "o" / LOG_NAME).read_text())
    assert line["reward_math_only_mean"] == 0.0 and line["reward_count_only_mean"] == 0.5
    assert line["reward_mean"] == 0.25  # over all 16 rows: count rows 1 or 0, math rows 0
    with pytest.raises(UserError, match=r"^no reward scored completion 0 of question .*every reward returned None"):
        train_grpo(GRPOConfig(**{**cfg.__dict__, "grpo_output": str(tmp_path / "x")}), reward_funcs=[math_only],
                   train_records=[dict(r, task="count") for r in rows], eval_records=rows,
                   rollout=_fixed_rollouts(tiny_tokenizer, texts))


# Gold answers, hand-checked: (cell, the value it is taken as, or None: refused in one line)
GOLD_FORMS = [
    ("72", 72.0), ("1,080", 1080.0), ("$18", 18.0), ("-5", -5.0), (".5", 0.5), ("18 dollars", 18.0),
    ("3/4", 0.75), ("-3/4", -0.75), ("6 / 8", 0.75), ("2 1/2", 2.5), ("-2 1/2", -2.5), ("Work.\n#### 3/4", 0.75),
    ("1/2/3", None), ("10/12/2020", None), ("3/0", None), ("1.5/2", None), ("2 3/2", None), ("3/4.5", None),
    ("Work.\n#### 1/0", None), ("abc", None),
]


@pytest.mark.parametrize("cell,value", GOLD_FORMS)
def test_a_gold_fraction_is_taken_exactly_or_refused_in_one_line(cell, value):
    """`3/4` is 0.75 (never 3, as it once was), `2 1/2` is 2.5; a form that is not one exact number stops
    the run in one line naming the row, as any non-number does."""
    from data import as_records
    from rewards import parse_number

    rows = [{"question": "How much?", "answer": cell}]
    if value is None:
        with pytest.raises(UserError, match=r"^rows: row 1, column 'answer': .*not a number.*3/4 or 2 1/2") as info:
            as_records(rows, Fields(), "rows")
        assert "\n" not in str(info.value)
    else:
        assert parse_number(as_records(rows, Fields(), "rows")[0]["answer"]) == value


def _two_configs(folder):
    """A dataset folder with two configurations (as a hub dataset such as openai/gsm8k has: main, socratic),
    `main` with train and validation splits."""
    for config, splits in (("main", ("train", "validation")), ("other", ("train",))):
        (folder / config).mkdir(parents=True)
        for split in splits:
            rows = [{"question": f"{config} {split} {i}?", "answer": str(i)} for i in range(1, 6)]
            (folder / config / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    entries = "".join(f"- config_name: {c}\n  data_files:\n" + "".join(
        f"  - split: {s}\n    path: {c}/{s}.jsonl\n" for s in splits)
        for c, splits in (("main", ("train", "validation")), ("other", ("train",))))
    (folder / "README.md").write_text(f"---\nconfigs:\n{entries}---\n")


def test_a_dataset_configuration_and_its_splits_are_named(tmp_path):
    """`--dataset ID:CONFIG` picks a configuration; --train_split/--test_split name the splits; what fails
    is said as it is (a configuration to name, a split it lacks), never as an unreachable hub."""
    from data.tables import load_hub

    _two_configs(tmp_path / "ds")
    ds = str(tmp_path / "ds")
    with pytest.raises(UserError, match=r"^cannot load dataset '.*ds': ValueError: Config name is missing\. .*"
                                        r"\['main', 'other'\].*; name one as --dataset ID:CONFIG$"):
        load_hub(ds, "train", Fields())
    assert load_hub(f"{ds}:other", "train", Fields())[0]["question"] == "other train 1?"
    held = load_hub(f"{ds}:main", "test", Fields(test_split="validation"))
    assert [r["question"] for r in held] == [f"main validation {i}?" for i in range(1, 6)]
    with pytest.raises(UserError, match=r"^--test_split dev: '.*ds:main' has no such split \(it has train, "
                                        r"validation\)$"):
        load_hub(f"{ds}:main", "test", Fields(test_split="dev"))
    with pytest.raises(UserError, match=r"^--train_split/--test_split name a hub dataset's or a folder's splits; "
                                        r"gsm8k's are train and test$"):
        load_records("gsm8k", "test", fields=Fields(test_split="validation"))


def test_an_unreachable_hub_is_said_as_such(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from data.tables import load_hub

    with pytest.raises(UserError, match=r"^cannot load dataset 'openai/gsm8k:main': .*; offline, a hub dataset loads "
                                        r"only from its cache"):
        load_hub("openai/gsm8k:main", "train", Fields())


def test_a_folders_split_files_are_named_too(tmp_path):
    (tmp_path / "training.jsonl").write_text(json.dumps({"question": "q?", "answer": "1"}) + "\n")
    (tmp_path / "dev.csv").write_text("question,answer\nd?,2\n")
    fields = Fields(train_split="training", test_split="dev")
    assert load_records(str(tmp_path), "train", fields=fields)[0]["question"] == "q?"
    assert load_records(str(tmp_path), "test", fields=fields)[0]["question"] == "d?"
    with pytest.raises(UserError, match=r"^--test_split val: .* has no such split \(it has dev, training\)$"):
        load_records(str(tmp_path), "test", fields=Fields(train_split="training", test_split="val"))


def test_the_split_names_apply_to_the_runs_dataset_not_to_other_eval_sets(tmp_path):
    """--test_split names the run's own dataset's split; an --eval_dataset beside it (synthetic, another
    folder) is read with its own train and test."""
    from data import other_eval_sets, run_records
    from grpo.config import GRPOConfig

    (tmp_path / "training.jsonl").write_text(json.dumps({"question": "q?", "answer": "1"}) + "\n")
    (tmp_path / "dev.csv").write_text("question,answer\nd?,2\n")
    cfg = GRPOConfig(dataset=str(tmp_path), train_split="training", test_split="dev", eval_every=1,
                     eval_dataset=("main=" + str(tmp_path), "seen=synthetic:add"), eval_samples=3)
    train, held_out = run_records(cfg, None, None)
    assert train[0]["question"] == "q?" and held_out[0]["question"] == "d?"
    assert len(other_eval_sets(cfg)["seen"]) == 3
