"""One table of what `scripts/cuda_checks.sh` measured: each part's status, seconds and key figures.

    python -m benchmarks.summary OUT_DIR

Reads OUT_DIR/parts.tsv (part, status, seconds) and each part's JSON line in OUT_DIR/results.jsonl
(tagged with its "part").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.errors import fail, run_cli
from common.flags import OneLineParser

FIGURES = {  # JSON key -> label, in the order shown
    "ours_tokens_per_s": "ours tok/s", "ours_graphs_tokens_per_s": "graphed tok/s",
    "generate_tokens_per_s": "generate tok/s", "speedup": "x generate", "speedup_graphs": "graphed x generate",
    "ours_share_of_roofline": "roofline share", "ours_graphs_share_of_roofline": "graphed roofline share",
    "launches_per_step_eager": "launches/step", "launches_per_step_graphs": "graphed launches/step",
    "median_time_per_step_s": "s/step", "median_generation_time_s": "rollout s",
    "median_backward_time_s": "fwd+bwd s", "peak_memory_gb": "peak GB", "peak_memory_reserved_gb": "reserved GB",
}


def rows(out: Path) -> list[tuple[str, str, str, str]]:
    parts = out / "parts.tsv"
    if not parts.is_file():
        fail(f"no {parts}: run scripts/cuda_checks.sh {out} first")
    results = out / "results.jsonl"
    records = {}
    for line in (results.read_text().splitlines() if results.is_file() else []):
        if line.strip():
            record = json.loads(line)
            records[record.get("part")] = record  # a part's last line
    table = []
    for line in parts.read_text().splitlines():
        name, state, seconds = line.split("\t")
        record = records.get(name, {})
        figures = ", ".join(f"{label} {record[key]}" for key, label in FIGURES.items() if key in record)
        table.append((name, state, seconds, figures or "-"))
    return table


def main(argv: list[str] | None = None) -> None:
    p = OneLineParser(prog="python -m benchmarks.summary", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="the folder scripts/cuda_checks.sh wrote")
    table = rows(Path(p.parse_args(argv).out_dir))
    widths = [max(len(r[i]) for r in [("part", "status", "s", "figures"), *table]) for i in range(3)]
    for r in [("part", "status", "s", "figures"), *table]:
        print(" | ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + " | " + r[3])


if __name__ == "__main__":
    run_cli(main)
