"""Plots and a console summary of a GRPO (or SFT) JSONL log.

The reader is forgiving of what crashes and old runs leave: a torn last line is skipped with a
warning, missing optional fields are warned about once and their panels left out.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from common.errors import fail
from models.card import wilson

GRPO_FIELDS = ["grpo_loss", "policy_loss", "kl_loss", "grad_norm", "learning_rate", "reward_mean", "reward_std",
               "adv_mean", "adv_std", "time_per_step_s", "generation_time_s", "backward_time_s", "other_time_s",
               "tokens_generated"]
SFT_FIELDS = ["loss", "grad_norm", "learning_rate", "time_per_step_s", "tokens"]
PLOTS = ("losses.png", "rewards.png", "timing.png", "tokens.png")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def read_log(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL log in step order; one-line error when the log is absent or empty."""
    if not path.is_file():
        fail(f"no log at {path}: pass --log_file <run>/grpo_training_logs.jsonl (or sft_training_logs.jsonl)")
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            where = "last line" if lineno == len(lines) else f"line {lineno}"
            warn(f"{path}: {where} is not valid JSON (a run cut short?); skipped")
    records = [r for r in records if isinstance(r, dict) and "step" in r]
    if not records:
        fail(f"{path} holds no log records yet; run training first")
    return sorted(records, key=lambda r: r["step"])


def kind_of(records: list[dict[str, Any]]) -> str:
    return "grpo" if any("reward_mean" in r for r in records) else "sft"


def series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) where `key` is logged with a finite value."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Exponential moving average, bias-corrected; the weight grows with the run's length."""
    if weight is None:
        weight = min(0.9, max(0.0, 1 - 5 / max(1, len(values))))
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i) if weight < 1 else v)
    return out


def best_point(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """(step, value) of the best held-out score as --keep_best keeps it (training/run.py, best/best.json):
    the highest over the trained steps (step 0, the starting model, is never kept), the earliest of a
    tie. The console summaries name this one, so every "best" of a run is the same step."""
    points = [(x, y) for x, y in zip(xs, ys) if x > 0] or list(zip(xs, ys))
    if not points:
        return None
    top = max(y for _, y in points)
    return next((x, y) for x, y in points if y == top)


def eval_sizes(log_dir: Path, key: str) -> dict[int, int]:
    """step -> problems scored, for a held-out accuracy field of the log in `log_dir`, read from the eval
    summaries each in-training eval keeps (<run>/eval/step_N[/<set>]/eval_summary.json); {} when absent."""
    name = key.removeprefix("eval_").removesuffix("_accuracy") if key != "eval_accuracy" else ""
    sizes = {}
    for folder in (log_dir / "eval").glob("step_*"):
        if not folder.name[5:].isdigit():
            continue
        for path in ((folder / name / "eval_summary.json") if name else None, folder / "eval_summary.json"):
            if path is not None and path.is_file():
                try:
                    sizes[int(folder.name[5:])] = int(json.loads(path.read_text())["num_questions"])
                except (OSError, ValueError, KeyError, TypeError):
                    pass
                break
    return sizes


def accuracy_points(ax: Any, xs: list[float], ys: list[float], sizes: dict[int, int], color: str, label: str) -> None:
    """Held-out accuracy at each eval, with its 95% Wilson interval where the problems scored are known
    (on 20 problems 0.55 -> 0.45 is within the noise; the bars say so)."""
    ax.plot(xs, ys, "o-", color=color, label=label, markersize=4)
    known = [(x, y, sizes[int(x)]) for x, y in zip(xs, ys) if int(x) in sizes]
    if known:
        low = [y - wilson(y, n)[0] for _, y, n in known]
        high = [wilson(y, n)[1] - y for _, y, n in known]
        ax.errorbar([x for x, _, _ in known], [y for _, y, _ in known], yerr=[low, high], fmt="none", ecolor=color,
                    alpha=0.5, capsize=3)


def informative(keys: list[str], runs: list[list[dict[str, Any]]]) -> tuple[list[str], list[str]]:
    """(the keys worth a panel, a note for each left out): a field constant over the run(s) (KL at beta 0,
    a one-reward sum) or equal at every step to one already shown (the main held-out set is both
    eval_accuracy and eval_<name>_accuracy) tells nothing a panel would."""
    kept, notes, shown = [], [], {}
    for key in keys:
        per_run = tuple(tuple(zip(*series(records, key))) for records in runs)
        values = [y for run in per_run for _, y in run]
        if not values:
            continue
        if len(values) > 1 and len(set(values)) == 1:
            notes.append(f"{key} is {values[0]:g} throughout")
            continue
        if per_run in shown:
            notes.append(f"{key} equals {shown[per_run]}")
            continue
        shown[per_run] = key
        kept.append(key)
    return kept, notes


def _missing(records: list[dict[str, Any]], fields: list[str]) -> list[str]:
    return [f for f in fields if not series(records, f)[0]]


def _line_panel(ax, records, key, title, ylabel, color="C0"):
    xs, ys = series(records, key)
    if not xs:
        ax.set_visible(False)
        return
    ax.plot(xs, ys, "o" if len(xs) < 3 else "-", color=color, alpha=0.3, markersize=3, linewidth=1, label="per step")
    if len(xs) >= 3:
        ax.plot(xs, smooth(ys), color=color, linewidth=2, label="smoothed")
        ax.legend(loc="best", fontsize=8)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _band_panel(ax, records, mean_key, std_key, title, ylabel, color):
    xs, mean = series(records, mean_key)
    if not xs:
        ax.set_visible(False)
        return
    std_by_step = dict(zip(*series(records, std_key)))
    std = [std_by_step.get(x, 0.0) for x in xs]
    ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=color,
                    alpha=0.15, label="± std")
    ax.plot(xs, mean, color=color, alpha=0.35, linewidth=1, label="mean per step")
    if len(xs) >= 3:
        ax.plot(xs, smooth(mean), color=color, linewidth=2, label="mean, smoothed")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def named_evals(records: list[dict[str, Any]]) -> list[str]:
    """eval_<name>_accuracy of each named held-out set (several --eval_dataset), in order of appearance."""
    keys = dict.fromkeys(k for r in records for k in r
                         if k.startswith("eval_") and k.endswith("_accuracy") and k != "eval_accuracy")
    return list(keys)


def reward_names(records: list[dict[str, Any]]) -> list[str]:
    """The reward functions a GRPO log has its own columns for (`reward_<name>_mean`), in log order."""
    names: dict[str, None] = {}
    for r in records:
        for key in r:
            if key.startswith("reward_") and key.endswith("_mean") and key != "reward_mean":
                names[key.removeprefix("reward_").removesuffix("_mean")] = None
    return list(names)


def _reward_parts_panel(ax: Any, records: list[dict[str, Any]], names: list[str]) -> None:
    """Each reward function's mean per step, so a weighted sum's parts can be told apart."""
    for i, name in enumerate(names):
        xs, ys = series(records, f"reward_{name}_mean")
        ax.plot(xs, ys, color=f"C{i}", linewidth=1.5, label=name)
    ax.set_title("Each reward (mean per step)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)


MAX_COLUMNS = 3  # panels a row: 3 x 4.8 in at 110 dpi is 1,584 px, a laptop screen's width


def grid(plt: Any, n: int, width: float = 4.8, height: float = 3.6) -> tuple[Any, list[Any]]:
    """A figure of `n` panels, at most MAX_COLUMNS a row; the panels in reading order, spare ones hidden."""
    cols = max(1, min(MAX_COLUMNS, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[max(1, n):]:
        ax.set_visible(False)
    return fig, list(axes.flat[:max(1, n)])


def _losses_figure(plt: Any, records: list[dict[str, Any]], grpo: bool, log_dir: Path | None) -> Any:
    """The losses, the gradient norm and the learning rate, a panel each."""
    loss_panels = ([("grpo_loss", "GRPO loss", "loss"), ("policy_loss", "Policy loss", "loss"),
                    ("kl_loss", "KL loss (beta * KL)", "loss")] if grpo else [("loss", "SFT loss", "cross-entropy")])
    loss_panels += [("grad_norm", "Gradient norm (before clipping)", "L2 norm"),
                    ("learning_rate", "Learning rate", "lr")]
    # at beta 0 the KL loss is 0 and the policy loss is the GRPO loss: one panel, not three
    shown, _ = informative([k for k, _, _ in loss_panels if k != "learning_rate"], [records])
    loss_panels = [p for p in loss_panels if p[0] in shown or p[0] == "learning_rate"]
    fig, axes = grid(plt, len(loss_panels), 4.2)
    for i, (ax, (key, name, unit)) in enumerate(zip(axes, loss_panels)):
        _line_panel(ax, records, key, name, unit, color=f"C{i}")
    return fig


def _eval_panel(ax: Any, records: list[dict[str, Any]], eval_keys: list[str], log_dir: Path | None) -> None:
    """Held-out accuracy per eval set (with 95% Wilson intervals where `log_dir` keeps the eval summaries)
    and the format rate."""
    for i, key in enumerate(eval_keys):
        xs, ys = series(records, key)
        label = key.removeprefix("eval_").replace("_", " ")
        if key.endswith("_accuracy"):
            accuracy_points(ax, xs, ys, eval_sizes(log_dir, key) if log_dir else {}, f"C{i}", label)
        else:
            ax.plot(xs, ys, "o-", color=f"C{i}", label=label)
    ax.set_title("Held-out eval (95% intervals)")
    ax.set_xlabel("step")
    ax.set_ylabel("share of problems")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def _rewards_figure(plt: Any, records: list[dict[str, Any]], grpo: bool, log_dir: Path | None) -> Any:
    """GRPO's reward and advantage bands, each reward's mean, and the held-out eval."""
    named = named_evals(records)  # several held-out sets: each its curve (the first is also eval_accuracy)
    eval_keys = [k for k in (*named, "eval_format_rate") if series(records, k)[0]] if named else \
        [k for k in ("eval_accuracy", "eval_format_rate") if series(records, k)[0]]
    parts = reward_names(records) if grpo else []
    if parts and not informative(["reward_mean", *(f"reward_{n}_mean" for n in parts)], [records])[0][1:]:
        parts = []  # one reward, or parts that each equal the sum: the reward panel already shows it
    panels = (2 if grpo else 0) + (1 if parts else 0) + (1 if eval_keys else 0)
    fig, axes = grid(plt, max(1, panels), 4.8, 3.8)
    if grpo:
        _band_panel(axes.pop(0), records, "reward_mean", "reward_std", "Reward (the weighted sum)", "reward", "C2")
        _band_panel(axes.pop(0), records, "adv_mean", "adv_std", "Advantage", "advantage", "C4")
    if parts:
        _reward_parts_panel(axes.pop(0), records, parts)
    if eval_keys:
        _eval_panel(axes.pop(0), records, eval_keys, log_dir)
    elif not grpo:
        axes[0].text(0.5, 0.5, "no rewards or eval in this log", ha="center", va="center")
        axes[0].set_axis_off()
    return fig


def _timing_figure(plt: Any, records: list[dict[str, Any]], grpo: bool, log_dir: Path | None) -> Any:
    """GRPO's step time stacked by phase, and every run's total time per step."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    if grpo:
        steps = [r["step"] for r in records]
        bottom = [0.0] * len(steps)
        for key, name, color in (("generation_time_s", "generation", "C0"), ("backward_time_s", "forward+backward",
                                                                                "C1"), ("other_time_s", "other", "C2")):
            values = [float(r.get(key) or 0.0) for r in records]
            ax1.bar(steps, values, bottom=bottom, color=color, label=name, width=0.9)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax1.legend(loc="best", fontsize=8)
        ax1.set_title("Time per step, by phase")
        ax1.set_xlabel("step")
        ax1.set_ylabel("seconds")
        ax1.grid(alpha=0.3, axis="y")
    else:
        ax1.set_axis_off()
    _line_panel(ax2, records, "time_per_step_s", "Total time per step", "seconds", color="C3")
    return fig


def _tokens_figure(plt: Any, records: list[dict[str, Any]], grpo: bool, log_dir: Path | None) -> Any:
    """Tokens generated (GRPO) or trained (SFT) per step."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    key = "tokens_generated" if grpo else "tokens"
    _line_panel(ax, records, key, "Tokens generated per step" if grpo else "Tokens trained per step", "tokens")
    return fig


FIGURES = {"losses": _losses_figure, "rewards": _rewards_figure, "timing": _timing_figure, "tokens": _tokens_figure}


def plot_all(records: list[dict[str, Any]], out: Path, title: str, log_dir: Path | None = None) -> list[Path]:
    """Write the four PNGs (FIGURES: <name>.png) into `out`; return their paths. Panels are grids at most
    MAX_COLUMNS wide; a field constant over the run or equal to another panel's is left out (`informative`);
    held-out accuracy carries 95% Wilson intervals when `log_dir` keeps the eval summaries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    grpo = kind_of(records) == "grpo"
    written = []
    for name, draw in FIGURES.items():
        fig = draw(plt, records, grpo, log_dir)
        fig.suptitle(f"{title}: {name}")
        fig.tight_layout()
        written.append(out / f"{name}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def eval_bests(records: list[dict[str, Any]]) -> list[tuple[str, list[float], list[float], tuple[float, float]]]:
    """(key, steps, accuracies, best (step, accuracy)) of each held-out accuracy the log holds: eval_accuracy,
    then each named eval set's; the best as --keep_best keeps it (`best_point`)."""
    found = []
    for key in ["eval_accuracy", *named_evals(records)]:
        xs, ys = series(records, key)
        best = best_point(xs, ys)
        if best:
            found.append((key, xs, ys, best))
    return found


def summary_lines(records: list[dict[str, Any]]) -> list[str]:
    """The console summary: steps, rewards, step time and its split, tokens."""
    grpo = kind_of(records) == "grpo"
    trained = [r for r in records if r["step"] > 0]
    lines = [f"steps logged: {len(trained)} (last step {records[-1]['step']})"]
    if grpo:
        _, rewards = series(records, "reward_mean")
        if rewards:
            lines.append(f"reward: first {rewards[0]:.3f}, last {rewards[-1]:.3f}, best {max(rewards):.3f}, "
                         f"mean of last 10 {sum(rewards[-10:]) / len(rewards[-10:]):.3f}")
    else:
        _, losses = series(records, "loss")
        if losses:
            lines.append(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f}, best {min(losses):.4f}")
    for key, _, acc, best in eval_bests(records):
        name = key.removeprefix("eval_").removesuffix("accuracy").replace("_", " ")
        lines.append(f"eval {name}accuracy: first {acc[0]:.3f}, last {acc[-1]:.3f}, best {best[1]:.3f} at step "
                         f"{best[0]}")
    _, times = series(records, "time_per_step_s")
    if times:
        mean = sum(times) / len(times)
        split = ""
        if grpo:
            parts = []
            for key, name in (("generation_time_s", "generation"), ("backward_time_s", "forward+backward"),
                              ("other_time_s", "other")):
                _, v = series(records, key)
                if v:
                    parts.append(f"{name} {sum(v) / len(v):.2f}s ({100 * sum(v) / max(sum(times), 1e-9):.0f}%)")
            split = ": " + ", ".join(parts)
        lines.append(f"time per step: mean {mean:.2f}s{split}; total {sum(times):.1f}s")
        _, tokens = series(records, "tokens_generated" if grpo else "tokens")
        if tokens:
            lines.append(f"tokens {'generated' if grpo else 'trained'}: {int(sum(tokens))} "
                         f"({sum(tokens) / max(sum(times), 1e-9):.0f} tokens/s over step time)")
    return lines


def visualize(log_file: str, output: str) -> list[Path]:
    path = Path(log_file)
    records = read_log(path)
    expected = GRPO_FIELDS if kind_of(records) == "grpo" else SFT_FIELDS
    missing = _missing(records, expected)
    if missing:
        warn(f"{path} lacks {', '.join(missing)}; those panels are left out")
    title = f"{kind_of(records).upper()} {path.parent.name or path.stem}"
    written = plot_all(records, Path(output), title, path.parent)
    for line in summary_lines(records):
        print(line)
    print("plots: " + ", ".join(str(p) for p in written))
    return written
