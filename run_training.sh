#!/usr/bin/env bash
# The pipeline, one stage after another; each stage's output feeds the next, and the first failing
# stage stops the run with its name.
#   ./run_training.sh          the real recipe: Qwen/Qwen3-0.6B on GSM8K (GPU; needs the hub or GSM8K_DIR)
#   ./run_training.sh --tiny   offline preset: the built-in tiny model on synthetic problems, CPU, minutes
set -euo pipefail
cd "$(dirname "$0")"
preset=real
for arg in "$@"; do
  case "$arg" in
    --tiny) preset=tiny ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $arg (use --tiny or nothing)" >&2; exit 2 ;;
  esac
done

scripts/setup.sh
PY=.venv/bin/python
stage() {
  local name=$1; shift
  echo "== [$name] $*"
  "$@" || { echo "error: stage '$name' failed (exit $?)" >&2; exit 1; }
}

if [ "$preset" = tiny ]; then
  export HF_HUB_OFFLINE=1
  stage reward-selftest $PY -m rewards
  stage smoke $PY -m models --model tiny --dataset synthetic
else
  stage reward-selftest $PY -m rewards
  stage smoke $PY -m models --model Qwen/Qwen3-0.6B --dataset gsm8k
fi
