"""Several runs on one figure, the everyday question "which of my runs is better": each metric the runs
log (reward, loss, held-out accuracy of each set, completion length, KL) in its own panel, one line per
run, and a console line per run with its best and last held-out accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.errors import fail
from viz.plots import accuracy_points, eval_bests, eval_sizes, informative, named_evals, read_log, series, smooth

COMPARED = (  # (log field, panel title, smoothed)
    ("reward_mean", "reward (smoothed)", True), ("loss", "SFT loss (smoothed)", True),
    ("eval_accuracy", "held-out accuracy", False), ("completion_len_mean", "completion length (smoothed)", True),
    ("kl", "KL to the reference (smoothed)", True))


MAX_COLUMNS = 3  # panels a row: 3 x 4.8 in at 110 dpi is 1,584 px, a laptop screen's width


def compare(logs: list[tuple[str, list[dict[str, Any]]]], out: Path,
            dirs: list[Path] | None = None) -> tuple[Path, list[str]]:
    """compare.png in `out`: a grid (at most MAX_COLUMNS wide) of one panel per metric the (label, records)
    runs log, leaving out a metric constant over every run or equal to one already shown; held-out
    accuracy points carry 95% Wilson intervals where the run folders (`dirs`, one per log) keep their
    eval summaries. Returns the path and a note for each metric left out."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    named = list(dict.fromkeys(k for _, records in logs for k in named_evals(records)))
    titles = {key: (title, smoothed) for key, title, smoothed in COMPARED}
    titles.update({key: (key.removeprefix("eval_").replace("_", " "), False) for key in named})
    keys, notes = informative([key for key, _, _ in COMPARED] + named, [records for _, records in logs])
    cols = max(1, min(MAX_COLUMNS, len(keys)))
    rows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
        title, smoothed = titles[key]
        for i, (label, records) in enumerate(logs):
            xs, ys = series(records, key)
            if not xs:
                continue
            if key.endswith("accuracy"):
                sizes = eval_sizes(dirs[i], key) if dirs else {}
                accuracy_points(ax, xs, ys, sizes, f"C{i}", label)
            else:
                ax.plot(xs, smooth(ys) if smoothed else ys, "-" if smoothed else "o-", color=f"C{i}", label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "compare.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, notes


def compare_lines(logs: list[tuple[str, list[dict[str, Any]]]]) -> list[str]:
    """A line per run: steps, last reward or loss, held-out accuracy (last and best, at which step: the
    best as --keep_best keeps it, `best_point`)."""
    lines = []
    for label, records in logs:
        parts = [f"{label}: {max((r['step'] for r in records), default=0)} steps"]
        for key, name in (("reward_mean", "reward"), ("loss", "loss")):
            _, ys = series(records, key)
            if ys:
                parts.append(f"last {name} {ys[-1]:.3f}")
        for key, _, ys, best in eval_bests(records):
            parts.append(f"{key.removeprefix('eval_')} last {ys[-1]:.3f}, best {best[1]:.3f} at step {best[0]}")
        lines.append("; ".join(parts))
    return lines


def compare_files(files: list[str], labels: list[str] | None, output: str) -> Path:
    """The runs in `files` (labelled by `labels`, default each log's folder name) on one figure."""
    if labels and len(labels) != len(files):
        fail(f"{len(labels)} --labels for {len(files)} --log_file: give one label per log, in order")
    names = labels or [Path(f).parent.name or Path(f).stem for f in files]
    logs = [(name, read_log(Path(f))) for name, f in zip(names, files)]
    path, notes = compare(logs, Path(output), [Path(f).parent for f in files])
    for line in compare_lines(logs):
        print(line)
    if notes:
        print("not drawn: " + "; ".join(notes))
    print(f"plot: {path}")
    return path
