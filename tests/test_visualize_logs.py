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
