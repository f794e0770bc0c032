#!/usr/bin/env bash
# Make ./.venv and install the project into it. Idempotent: a second run with unchanged
# requirements only checks a stamp and returns.
#   - CUDA machine (nvidia-smi sees a GPU): when $PYTHON already has a CUDA build of torch (a GPU
#     image, a conda env), the venv is made with --system-site-packages and uses that torch, which
#     then satisfies `torch>=2.6` (SYSTEM_TORCH=0 turns this off); otherwise pip takes torch from
#     requirements.txt (a CUDA build). Either way it says which torch and CUDA build it found, and a
#     CPU-only torch in the venv stops it with one line (a .venv made earlier on a CPU machine).
#   - CPU machine: the CPU build $TORCH_CPU_SPEC (default torch==2.13.0) is installed first, so the
#     loose `torch>=2.6` in requirements.txt is already satisfied and no multi-GB CUDA build is pulled.
#   - Versions: the exact ones in constraints.txt, those the whole suite passed with (PINS=loose takes
#     requirements*.txt's ranges instead; scripts/pin_versions.sh refreshes the pins on purpose).
#   - The project itself is installed editable (pip install -e .), so its packages import from any folder.
# Env: PYTHON (interpreter, default python3), VENV (default .venv), TORCH_CPU_SPEC, SYSTEM_TORCH
# (auto|0), DEV=0 to skip pytest/hypothesis/ruff, PINS (exact|loose).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_CPU_SPEC=${TORCH_CPU_SPEC:-torch==2.13.0}
SYSTEM_TORCH=${SYSTEM_TORCH:-auto}
DEV=${DEV:-1}
PINS=${PINS:-exact}
case "$PINS" in
  exact) pins=(-c constraints.txt) ;;
  loose) pins=() ;;
  *) echo "error: PINS must be exact or loose (got '$PINS')" >&2; exit 2 ;;
esac
req=requirements.txt
[ "$DEV" = 1 ] && req=requirements-dev.txt

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  accel=cuda
else
  accel=cpu
fi
stamp="$VENV/.installed-$accel-$(cat requirements.txt requirements-dev.txt constraints.txt pyproject.toml "$0" | sha256sum \
  | cut -c1-16)-dev$DEV-$PINS"
if [ -f "$stamp" ]; then
  exit 0
fi

# "VERSION CUDA" of the torch an interpreter imports ("VERSION cpu" for a CPU-only build), or nothing
torch_build() {
  "$1" -c 'import torch; print(torch.__version__, torch.version.cuda or "cpu")' 2>/dev/null || true
}
# On a GPU machine a CPU-only torch can only end in "no CUDA GPU visible" later: stop now, in one line.
refuse_cpu_torch() {
  local build
  build=$(torch_build "$VENV/bin/python")
  if [ "$accel" = cuda ] && [ "${build##* }" = cpu ]; then
    echo "error: $VENV has torch ${build% *}, a CPU-only build, on a machine with an NVIDIA GPU; remove $VENV" \
      "and rerun (it then uses a CUDA torch of $PYTHON when there is one), or install a CUDA build of torch into it" >&2
    exit 2
  fi
}

echo "setup: preparing $VENV for $accel ($($PYTHON --version 2>&1))" >&2
# A dangling symlink (e.g. left by a git worktree) would make `venv` fail with "File exists".
if [ -L "$VENV" ] && [ ! -e "$VENV" ]; then rm "$VENV"; fi
if [ -x "$VENV/bin/python" ]; then
  refuse_cpu_torch
else
  venv_flags=()
  if [ "$accel" = cuda ] && [ "$SYSTEM_TORCH" != 0 ]; then
    found=$(torch_build "$PYTHON")
    if [ -n "$found" ] && [ "${found##* }" != cpu ]; then
      echo "setup: using $PYTHON's torch ${found% *} (CUDA ${found##* }) through --system-site-packages" >&2
      venv_flags=(--system-site-packages)
    fi
  fi
  "$PYTHON" -m venv "${venv_flags[@]}" "$VENV"
fi
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if [ "$accel" = cpu ]; then
  "${pip[@]}" "$TORCH_CPU_SPEC"
fi
"${pip[@]}" "${pins[@]}" -r "$req"
# editable: `import grpo` works from any folder, and edits here take effect without reinstalling
"${pip[@]}" --no-deps -e .
refuse_cpu_torch
build=$(torch_build "$VENV/bin/python")
echo "setup: torch ${build% *} ($([ "${build##* }" = cpu ] && echo "CPU build" || echo "CUDA ${build##* }")), versions $PINS" >&2
rm -f "$VENV"/.installed-*
touch "$stamp"
echo "setup: done ($VENV)" >&2
