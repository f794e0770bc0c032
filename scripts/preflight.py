"""Can this Python run the GPU checks? One line either way, before anything runs.

    python scripts/preflight.py          (scripts/cuda_checks.sh runs it first)

Exit 0: ready; 3: a package is missing or too old (the only case carried wheels can fix); 2: no CUDA GPU.

Reads the floors from requirements.txt (and pytest from requirements-dev.txt), looks at what is
installed without importing the project, and says what is missing and how to bring it: on a machine
without a network, `scripts/carry_wheels.sh` run elsewhere downloads exactly those wheels into .carry/,
which cuda_checks.sh installs from with pip --no-index (pip never reaches for the network).
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ("torch", "transformers", "peft", "numpy", "tqdm", "pyyaml", "safetensors", "pytest")  # for the checks
IMPORT_NAME = {"pyyaml": "yaml"}
MISSING = 3  # the exit status that says: bring the wheels


def floors() -> dict[str, str]:
    """{package: minimum version or ''} for NEEDED, from the requirements files."""
    found = {}
    for name in ("requirements.txt", "requirements-dev.txt"):
        for line in (ROOT / name).read_text().splitlines():
            m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:>=\s*([0-9][0-9.]*))?", line.split("#")[0])
            if m and m.group(1).lower() in NEEDED:
                found[m.group(1).lower()] = m.group(2) or ""
    return {p: found.get(p, "") for p in NEEDED}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def missing(installed: dict[str, str | None]) -> list[str]:
    """'pkg>=floor (found X)' or 'pkg (not installed)' for each package below its floor."""
    out = []
    for pkg, floor in floors().items():
        have = installed.get(pkg)
        if have is None:
            out.append(f"{pkg}{'>=' + floor if floor else ''} (not installed)")
        elif floor and _version(have) < _version(floor):
            out.append(f"{pkg}>={floor} (found {have})")
    return out


def installed_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in NEEDED:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def main() -> int:
    lacking = missing(installed_versions())
    if lacking:
        print(f"error: this Python lacks {', '.join(lacking)} for the GPU checks; on a machine with a network run "
              f"scripts/carry_wheels.sh, bring the .carry folder along, and run scripts/cuda_checks.sh again "
              f"(it installs from .carry with pip --no-index)", file=sys.stderr)
        return MISSING
    import torch

    if not torch.cuda.is_available():
        print(f"error: no CUDA GPU visible to {sys.executable} (torch {torch.__version__}); these checks need one",
              file=sys.stderr)
        return 2
    v = installed_versions()
    print(f"preflight: ok (python {sys.version.split()[0]}, torch {v['torch']}, CUDA {torch.version.cuda}, "
          f"transformers {v['transformers']}, peft {v['peft']}, {torch.cuda.get_device_name()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
