#!/usr/bin/env bash
# Download, here (with a network), the wheels a GPU machine without one lacks for scripts/cuda_checks.sh,
# into .carry/wheels (git-ignored), for its Python and platform (default: CPython 3.12, x86-64 Linux):
# transformers, peft, pytest and everything they need except torch and numpy (the GPU image has those),
# at the versions this machine's .venv runs, so both test the same code. Carry .carry along (~40 MB);
# cuda_checks.sh installs from it with pip --no-index when its preflight finds something missing.
#
#   scripts/carry_wheels.sh                  (PY_VERSION=3.12 PLATFORM=manylinux_2_28_x86_64 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PY_VERSION=${PY_VERSION:-3.12}
PLATFORM=${PLATFORM:-manylinux_2_28_x86_64}
# the closure of what the checks import, pinned to the installed versions, torch and its stack left out
mapfile -t pins < <("$PY" - <<'PYEOF'
import importlib.metadata as m
from packaging.requirements import Requirement
skip = {"torch", "numpy", "triton", "setuptools", "sympy", "networkx", "jinja2", "markupsafe", "mpmath"}
seen, stack = {}, ["transformers", "huggingface_hub", "tokenizers", "safetensors", "peft", "pyyaml", "pytest", "tqdm"]
while stack:
    name = stack.pop().lower().replace("_", "-")
    if name in seen or name in skip or name.startswith("nvidia"):
        continue
    try:
        seen[name] = m.version(name)
    except m.PackageNotFoundError:
        continue
    for text in m.requires(name) or []:
        req = Requirement(text)
        if not req.marker or req.marker.evaluate({"extra": "", "python_version": "3.12"}):
            stack.append(req.name)
print("\n".join(f"{k}=={v}" for k, v in sorted(seen.items())))
PYEOF
)
rm -rf .carry/wheels .carry/site
mkdir -p .carry/wheels
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform "$PLATFORM" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
  -d .carry/wheels "${pins[@]}" 2> >(grep -v "^WARNING: Location" >&2)
echo "${#pins[@]} wheels in .carry/wheels ($(du -sh .carry/wheels | cut -f1)); carry .carry to the GPU machine"
