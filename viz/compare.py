"""Several runs on one figure, the everyday question "which of my runs is better": each metric the runs
log (reward, loss, held-out accuracy of each set, completion length, KL) in its own panel, one line per
run, and a console line per run with its best and last held-out accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from viz.plots import named_evals, read_log, series, smooth

COMPARED = (  # (log field, panel title, smoothed)
    ("reward_mean", "reward (smoothed)", True), ("loss", "SFT loss (smoothed)", True),
    ("eval_accuracy", "held-out accuracy", False), ("completion_len_mean", "completion length (smoothed)", True),
    ("kl", "KL to the reference (smoothed)", True))


def compare(logs: list[tuple[str, list[dict[str, Any]]]], out: Path) -> Path:
    """compare.png in `out`: one panel per metric any of the (label, records) runs logs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    named = list(dict.fromkeys(k for _, records in logs for k in named_evals(records)))
    panels = [(key, title, smoothed) for key, title, smoothed in COMPARED
              if any(series(records, key)[0] for _, records in logs)]
    panels += [(key, key.removeprefix("eval_").replace("_", " "), False) for key in named]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 3.8), squeeze=False)
    for ax, (key, title, smoothed) in zip(axes[0], panels):
        for i, (label, records) in enumerate(logs):
            xs, ys = series(records, key)
            if xs:
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
    return path


def compare_lines(logs: list[tuple[str, list[dict[str, Any]]]]) -> list[str]:
    """A line per run: steps, last reward or loss, held-out accuracy (last and best, at which step)."""
    lines = []
    for label, records in logs:
        parts = [f"{label}: {max((r['step'] for r in records), default=0)} steps"]
        for key, name in (("reward_mean", "reward"), ("loss", "loss")):
            _, ys = series(records, key)
            if ys:
                parts.append(f"last {name} {ys[-1]:.3f}")
        for key in ["eval_accuracy", *named_evals(records)]:
            xs, ys = series(records, key)
            if ys:
                best = max(range(len(ys)), key=lambda i: ys[i])
                parts.append(f"{key.removeprefix('eval_')} last {ys[-1]:.3f}, best {ys[best]:.3f} at step {xs[best]}")
        lines.append("; ".join(parts))
    return lines


def compare_files(files: list[str], labels: list[str] | None, output: str) -> Path:
    """The runs in `files` (labelled by `labels`, default each log's folder name) on one figure."""
    from common.errors import fail

    if labels and len(labels) != len(files):
        fail(f"{len(labels)} --labels for {len(files)} --log_file: give one label per log, in order")
    names = labels or [Path(f).parent.name or Path(f).stem for f in files]
    logs = [(name, read_log(Path(f))) for name, f in zip(names, files)]
    path = compare(logs, Path(output))
    for line in compare_lines(logs):
        print(line)
    print(f"plot: {path}")
    return path
