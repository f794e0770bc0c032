import json
import subprocess
import sys

import pytest

from common.errors import UserError
from tests.conftest import ROOT
from viz.plots import PLOTS, read_log, smooth, summary_lines, visualize


def grpo_line(step, **extra):
    base = {"step": step, "grpo_loss": 0.01 * step, "policy_loss": 0.01 * step, "kl_loss": 0.0, "grad_norm": 1.0,
            "learning_rate": 1e-6, "reward_mean": 0.1 * step, "reward_std": 0.1, "adv_mean": 0.0, "adv_std": 1.0,
            "time_per_step_s": 2.0, "generation_time_s": 1.5, "backward_time_s": 0.4, "other_time_s": 0.1,
            "tokens_generated": 100}
    return json.dumps({**base, **extra})


def test_four_plots_and_summary(tmp_path, capsys):
    log = tmp_path / "grpo_training_logs.jsonl"
    log.write_text("\n".join(grpo_line(s, **({"eval_accuracy": 0.5} if s % 2 == 0 else {})) for s in range(1, 6)))
    written = visualize(str(log), str(tmp_path / "plots"))
    assert [p.name for p in written] == list(PLOTS)
    for p in written:
        assert p.stat().st_size > 10_000 and p.read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "steps logged: 5" in out and "reward: first 0.100, last 0.500, best 0.500" in out
    assert "generation 1.50s (75%)" in out and "tokens generated: 500 (50 tokens/s" in out


def test_truncated_last_line_and_missing_fields_warn(tmp_path, capsys):
    log = tmp_path / "g.jsonl"
    partial = json.dumps({"step": 2, "reward_mean": 0.3, "time_per_step_s": 1.0})
    log.write_text(grpo_line(1) + "\n" + partial + "\n" + grpo_line(3)[:25])
    records = read_log(log)
    assert [r["step"] for r in records] == [1, 2]
    visualize(str(log), str(tmp_path / "plots"))
    err = capsys.readouterr().err
    assert "last line is not valid JSON" in err
    assert all((tmp_path / "plots" / name).is_file() for name in PLOTS)


def test_sft_log(tmp_path, capsys):
    log = tmp_path / "sft_training_logs.jsonl"
    log.write_text("\n".join(json.dumps({"step": s, "loss": 2.0 / s, "grad_norm": 1.0, "learning_rate": 1e-4,
                                         "time_per_step_s": 0.5, "tokens": 1000}) for s in range(1, 5)))
    visualize(str(log), str(tmp_path / "plots"))
    assert "loss: first 2.0000, last 0.5000" in capsys.readouterr().out
    assert all((tmp_path / "plots" / name).is_file() for name in PLOTS)


def test_empty_or_absent_log_is_one_line_error(tmp_path):
    with pytest.raises(UserError, match="no log at"):
        read_log(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="no log records"):
        read_log(tmp_path / "empty.jsonl")
    result = subprocess.run([sys.executable, "visualize_logs.py", "--log_file", str(tmp_path / "empty.jsonl")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1


def test_smooth_and_summary():
    assert smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])
    values = smooth([0.0, 10.0] * 20)
    assert 3 < values[-1] < 7  # the smoothed line averages the noise
    assert summary_lines([json.loads(grpo_line(1))])[0] == "steps logged: 1 (last step 1)"


def test_several_runs_overlay_on_one_figure_with_a_line_each(tmp_path, capsys):
    a, b = tmp_path / "a" / "log.jsonl", tmp_path / "b" / "log.jsonl"
    for path, acc in ((a, 0.2), (b, 0.6)):
        path.parent.mkdir()
        path.write_text("\n".join(grpo_line(s, **({"eval_accuracy": acc * s / 4, "eval_seen_accuracy": 0.5}
                                                  if s % 2 == 0 else {})) for s in range(1, 5)))
    from visualize_logs import main

    main(["--log_file", str(a), str(b), "--labels", "full", "lora", "--output", str(tmp_path / "plots")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("full: 4 steps; last reward 0.400; accuracy last 0.200, best 0.200 at step 4")
    assert lines[1].startswith("lora: 4 steps; last reward 0.400; accuracy last 0.600, best 0.600 at step 4")
    assert "seen_accuracy last 0.500, best 0.500 at step 2" in lines[1]
    png = tmp_path / "plots" / "compare.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(UserError, match="1 --labels for 2 --log_file"):
        main(["--log_file", str(a), str(b), "--labels", "x", "--output", str(tmp_path / "p2")])


def _png_size(path):
    data = path.read_bytes()
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _keep_best_run(folder, kl, accuracies):
    """A GRPO run folder as a --keep_best run leaves it: the main held-out set logged both as eval_accuracy
    and eval_new_accuracy, a validation set, KL as given, eval summaries of 20 problems per step."""
    folder.mkdir(parents=True)
    lines = []
    for s in range(0, 7):
        extra = {"kl": kl(s), "completion_len_mean": 10.0 + s}
        if s % 2 == 0:
            acc = accuracies[s // 2]
            extra.update(eval_accuracy=acc, eval_new_accuracy=acc,
                         eval_validation_accuracy=[0.5, 0.25, 0.5, 0.5][s // 2])
            for name in ("", "validation"):
                summary = folder / "eval" / f"step_{s}" / name / "eval_summary.json"
                summary.parent.mkdir(parents=True, exist_ok=True)
                summary.write_text(json.dumps({"num_questions": 20}))
        lines.append(grpo_line(s, **extra) if s else json.dumps({"step": 0, **{k: v for k, v in extra.items()
                                                                                if k.startswith("eval_")}}))
    (folder / "grpo_training_logs.jsonl").write_text("\n".join(lines))
    return folder / "grpo_training_logs.jsonl"


def test_compare_is_a_laptop_wide_grid_without_duplicate_or_constant_panels(tmp_path, capsys):
    """Six metrics used to make a 3,300 x 418 px row; with --keep_best two panels drew the same curve and
    at beta 0 the KL panel was a flat line. Now a grid at most 1,600 px wide, and what is left out is said."""
    from visualize_logs import main

    a = _keep_best_run(tmp_path / "a", lambda s: 0.0, [0.1, 0.3, 0.5, 0.55])
    b = _keep_best_run(tmp_path / "b", lambda s: 0.0, [0.1, 0.2, 0.45, 0.5])
    main(["--log_file", str(a), str(b), "--output", str(tmp_path / "plots")])
    out = capsys.readouterr().out
    assert "not drawn: kl is 0 throughout; eval_new_accuracy equals eval_accuracy" in out
    width, height = _png_size(tmp_path / "plots" / "compare.png")
    assert width <= 1600 and height > 418  # reward, length, accuracy, validation: two rows of three
    c = _keep_best_run(tmp_path / "c", lambda s: 0.01 * s, [0.1, 0.3, 0.5, 0.55])
    main(["--log_file", str(c), str(b), "--output", str(tmp_path / "p2")])
    assert "kl is" not in capsys.readouterr().out  # KL that moves is drawn


def test_the_best_step_is_the_one_keep_best_keeps(tmp_path, capsys):
    """Validation accuracy 0.5 at steps 0, 4 and 6: --keep_best keeps step 4 (the first trained step with
    the top score; step 0 is the starting model), and both summaries say step 4 (the console said 0)."""
    from viz.compare import compare_lines
    from viz.plots import best_point

    log = _keep_best_run(tmp_path / "a", lambda s: 0.0, [0.1, 0.3, 0.5, 0.55])
    records = read_log(log)
    assert best_point([0, 2, 4, 6], [0.5, 0.25, 0.5, 0.5]) == (4, 0.5)
    assert best_point([0], [0.3]) == (0, 0.3)  # only the starting point: it is the best there is
    assert "validation_accuracy last 0.500, best 0.500 at step 4" in compare_lines([("a", records)])[0]
    visualize(str(log), str(tmp_path / "plots"))
    assert "eval validation accuracy: first 0.500, last 0.500, best 0.500 at step 4" in capsys.readouterr().out


def test_held_out_accuracy_points_carry_wilson_intervals(tmp_path):
    """On 20 problems a 0.55 -> 0.45 swing is within the noise: each point's 95% Wilson interval is drawn,
    from the number of problems the run's eval summaries record."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from models.card import wilson
    from viz.plots import accuracy_points, eval_sizes

    log = _keep_best_run(tmp_path / "a", lambda s: 0.0, [0.1, 0.3, 0.55, 0.45])
    assert eval_sizes(log.parent, "eval_accuracy") == {0: 20, 2: 20, 4: 20, 6: 20}
    assert eval_sizes(log.parent, "eval_validation_accuracy") == {0: 20, 2: 20, 4: 20, 6: 20}
    assert eval_sizes(tmp_path, "eval_accuracy") == {}  # a log without its run folder: no intervals, no error
    fig, ax = plt.subplots()
    accuracy_points(ax, [4, 6], [0.55, 0.45], {4: 20, 6: 20}, "C0", "accuracy")
    [bars] = ax.collections
    ends = [tuple(seg[:, 1]) for seg in bars.get_segments()]
    assert ends == [pytest.approx(wilson(0.55, 20)), pytest.approx(wilson(0.45, 20))]
    assert ends[0][0] < 0.45 and ends[1][1] > 0.55  # each holds the other's value: no trend to read
    plt.close(fig)
    visualize(str(log), str(tmp_path / "plots"))  # the single-run plots: as wide as compare.png at most
    assert all(_png_size(tmp_path / "plots" / name)[0] <= 1600 for name in PLOTS)
