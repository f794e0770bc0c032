"""Features that meet: the flags that change what a GRPO step does, combined so that every pair of their
values meets in at least one short run on `tiny` (all-pairs, a small greedy generator written here: no
new dependency). Each run checks that every number of the log is finite, that run_config.json replays
to the same config, and that the saved model loads and evaluates; with --keep_best the console's best
step is the one best/best.json keeps. One feature at a time passes its own tests; this is where two meet.

The runs are slow (`-m slow`): 2 steps each, 2 prompts of 2 completions, 8 new tokens; the coverage of
the generator is checked in the quick set."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from typing import Any

import pytest

from tests.conftest import crash_at_checkpoint

# each flag's values: every pair of values of two flags meets in one run at least
FACTORS: dict[str, list[Any]] = {
    "loss_type": ["grpo", "bnpo", "dr_grpo", "dapo"],
    "finetune": ["full", "lora"],
    "beta": [0.0, 0.04],
    "importance_sampling_level": ["token", "sequence"],
    "num_iterations": [1, 2],
    "dynamic_sampling": [False, True],
    "mask_truncated_completions": [False, True],
    "thinking": [False, True],
    "reward_format": ["text", "messages"],
    "rewards": ["one", "several_with_none"],
    "log_completions": ["0", "1"],
    "report_to": [(), ("tensorboard",)],
    "keep": ["nothing", "best_and_snapshots"],
    "eval_sets": ["one", "two"],
    "resume": [False, True],
}


def _pairs(row: dict[str, Any], names: list[str]) -> set[tuple]:
    return {(a, row[a], b, row[b]) for a, b in itertools.combinations(names, 2)}


def all_pairs(factors: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Rows (one value per factor) in which every pair of values of two factors meets at least once.

    Greedy and deterministic (after AETG): each row starts from the first pair not yet covered; the other
    factors are filled one by one, each with the value covering the most uncovered pairs with the values
    chosen so far (the first on a tie), trying every rotation of the fill order; the row that covers the
    most new pairs is kept."""
    names = list(factors)
    place = {n: i for i, n in enumerate(names)}

    def pair(a: str, va: Any, b: str, vb: Any) -> tuple:
        return (a, va, b, vb) if place[a] < place[b] else (b, vb, a, va)

    uncovered = {(a, va, b, vb) for a, b in itertools.combinations(names, 2) for va in factors[a] for vb in factors[b]}
    rows: list[dict[str, Any]] = []
    while uncovered:
        a, va, b, vb = min(uncovered, key=lambda p: (place[p[0]], place[p[2]], factors[p[0]].index(p[1]),
                                                     factors[p[2]].index(p[3])))
        best: tuple[int, dict[str, Any]] | None = None
        for shift in range(len(names)):
            row = {a: va, b: vb}
            for name in names[shift:] + names[:shift]:
                if name not in row:
                    chosen = dict(row)
                    row[name] = max(factors[name], key=lambda v, n=name, c=chosen: sum(
                        pair(m, c[m], n, v) in uncovered for m in c))
            row = {n: row[n] for n in names}
            gain = len(_pairs(row, names) & uncovered)
            if best is None or gain > best[0]:
                best = (gain, row)
        rows.append(best[1])
        uncovered -= _pairs(best[1], names)
    return rows


ROWS = all_pairs(FACTORS)


def test_the_generator_covers_every_pair_in_few_runs():
    names = list(FACTORS)
    want = {(a, va, b, vb) for a, b in itertools.combinations(names, 2) for va in FACTORS[a] for vb in FACTORS[b]}
    covered = set().union(*(_pairs(r, names) for r in ROWS))
    assert covered == want
    assert all(set(r) == set(names) and all(r[n] in FACTORS[n] for n in names) for r in ROWS)
    # the two largest factors alone need 4 x 2 runs; greedy all-pairs stays near that, far below the product
    assert 8 <= len(ROWS) <= 10, len(ROWS)
    assert all_pairs({"a": [1, 2], "b": [3, 4]}) == [{"a": 1, "b": 3}, {"a": 1, "b": 4}, {"a": 2, "b": 3},
                                                     {"a": 2, "b": 4}]


# the rewards the runs name as module:function, so run_config.json replays them
def by_length(completions: list[Any], **columns: Any) -> list[float]:
    """Rewards that differ within a group (the untrained tiny model never answers right), as either format."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [(len(t) % 5) / 4 for t in texts]


def by_length_or_none(completions: list[Any], question: list[str], **columns: Any) -> list[float | None]:
    """A reward for some rows only (multi-task data): None where the question's length is odd."""
    return [None if len(q) % 2 else v for q, v in zip(question, by_length(completions))]


def config_of(row: dict[str, Any], out: str) -> Any:
    from grpo.config import GRPOConfig

    keep = row["keep"] == "best_and_snapshots"
    return GRPOConfig(
        model_name="tiny", dataset="synthetic", grpo_output=out, device="cpu", show_progress=False, seed=3,
        max_steps=2, prompts_per_step=2, num_generations=2, micro_batch_size=2, max_completion_length=8,
        learning_rate=1e-4, eval_every=2, eval_samples=2, eval_max_new_tokens=8, save_every=1 if row["resume"] else 2,
        loss_type=row["loss_type"], finetune=row["finetune"], beta=row["beta"],
        importance_sampling_level=row["importance_sampling_level"], num_iterations=row["num_iterations"],
        dynamic_sampling=row["dynamic_sampling"], max_extra_rollouts=1,
        mask_truncated_completions=row["mask_truncated_completions"], enable_thinking=row["thinking"],
        reward_format=row["reward_format"],
        reward=(("tests.test_pairwise:by_length",) if row["rewards"] == "one" else
                ("numeric", "tests.test_pairwise:by_length_or_none")),
        log_completions=row["log_completions"], report_to=row["report_to"],
        keep_best=keep, validation_samples=2, save_model_every=1 if keep else 0, keep_snapshots=1 if keep else None,
        eval_dataset=("add=synthetic:add", "sub=synthetic:sub") if row["eval_sets"] == "two" else ())


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return []


@pytest.mark.slow  # 10 runs of 2 steps on tiny: 598 s on the 2-core VM shared with other jobs (dev/LOG.md)
@pytest.mark.parametrize("row", ROWS, ids=[f"run{i}" for i in range(len(ROWS))])
def test_every_pair_of_features_trains_replays_loads_and_evaluates(tmp_path, row, capsys, monkeypatch):
    import eval.__main__
    from common.flags import parse_flags
    from grpo.config import GRPOConfig
    from grpo.trainer import LOG_NAME, train_grpo
    from models import load_model_and_tokenizer

    out = tmp_path / "run"
    cfg = config_of(row, str(out))
    if row["resume"]:  # the run crashes in step 2's checkpoint; the same command with --resume finishes it
        with crash_at_checkpoint(monkeypatch, 2):
            train_grpo(cfg)
        cfg = dataclasses.replace(cfg, resume=True)
    train_grpo(cfg)

    log = [json.loads(x) for x in (out / LOG_NAME).read_text().splitlines()]
    assert [x["step"] for x in log if "grpo_loss" in x or "reward_mean" in x] == [1, 2]
    for line in log:
        bad = {k: v for k, v in line.items() if any(not math.isfinite(x) for x in _numbers(v))}
        assert not bad, (line["step"], bad)
    trained = [x for x in log if "reward_mean" in x]
    if row["rewards"] == "several_with_none":
        assert all("reward_numeric_mean" in x and "reward_by_length_or_none_mean" in x for x in trained)
    if row["thinking"]:
        assert all("thinking_tokens_mean" in x for x in trained)
    if row["eval_sets"] == "two":
        assert "eval_add_accuracy" in log[-1] and "eval_sub_accuracy" in log[-1]
    assert (out / "completions.jsonl").is_file() == (row["log_completions"] == "1")
    assert any((out / "tracker").rglob("events.out.tfevents.*")) == bool(row["report_to"])

    # the run as it was started: --resume is how it was continued, not part of the recipe
    replayed = parse_flags(GRPOConfig, ["--config", str(out / "run_config.json")], None)[0]
    assert replayed == dataclasses.replace(cfg, resume=False)

    models = [out]
    if row["keep"] == "best_and_snapshots":
        from viz.compare import compare_lines
        from viz.plots import read_log

        best = json.loads((out / "best" / "best.json").read_text())
        line = compare_lines([("run", read_log(out / LOG_NAME))])[0]
        assert f"best {best['validation_accuracy']:.3f} at step {best['step']}" in line.split("validation")[1]
        assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step_1"]
        models += [out / "best", out / "snapshots" / "step_1"]
    for folder in models:
        model, _ = load_model_and_tokenizer(str(folder), device="cpu")
        assert all(bool(p.isfinite().all()) for p in model.parameters())
    capsys.readouterr()
    eval.__main__.main(["--model", str(out), "--dataset", "synthetic", "--max_samples", "2", "--max_new_tokens", "4",
                        "--device", "cpu", "--output", str(tmp_path / "eval"), "--no_progress",
                        *(["--temperature", "0.6"] if row["thinking"] else [])])
    summary = json.loads((tmp_path / "eval" / "eval_summary.json").read_text())
    assert summary["num_questions"] == 2 and 0.0 <= summary["accuracy"] <= 1.0
