#!/usr/bin/env bash
# Make ./.venv and install the project into it. Idempotent: a second run with unchanged
# requirements only checks a stamp and returns.
#   - CUDA machine (nvidia-smi sees a GPU): torch comes from requirements.txt (torch>=2.6, CUDA build).
#   - CPU machine: the CPU build $TORCH_CPU_SPEC (default torch==2.13.0) is installed first, so the
#     loose `torch>=2.6` in requirements.txt is already satisfied and no multi-GB CUDA build is pulled.
# Env: PYTHON (interpreter, default python3), VENV (default .venv), TORCH_CPU_SPEC, DEV=0 to skip
# pytest/hypothesis/ruff.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_CPU_SPEC=${TORCH_CPU_SPEC:-torch==2.13.0}
DEV=${DEV:-1}
req=requirements.txt
[ "$DEV" = 1 ] && req=requirements-dev.txt

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  accel=cuda
else
  accel=cpu
fi
stamp="$VENV/.installed-$accel-$(cat requirements.txt requirements-dev.txt "$0" | sha256sum | cut -c1-16)-dev$DEV"
if [ -f "$stamp" ]; then
  exit 0
fi

echo "setup: creating $VENV for $accel ($($PYTHON --version 2>&1))" >&2
# A dangling symlink (e.g. left by a git worktree) would make `venv` fail with "File exists".
if [ -L "$VENV" ] && [ ! -e "$VENV" ]; then rm "$VENV"; fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if [ "$accel" = cpu ]; then
  "${pip[@]}" "$TORCH_CPU_SPEC"
fi
"${pip[@]}" -r "$req"
rm -f "$VENV"/.installed-*
touch "$stamp"
echo "setup: done ($VENV)" >&2
