#!/usr/bin/env bash
# Set up .venv (or $VENV) if needed, then run the test suite (extra args go to pytest).
# Set GSM8K_DIR to a folder with GSM8K's train.jsonl/test.jsonl to run the full-data tests too;
# ../shared/data/gsm8k is used when it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ -z "${GSM8K_DIR:-}" ] && [ -f ../shared/data/gsm8k/test.jsonl ]; then
  export GSM8K_DIR=../shared/data/gsm8k
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec "${VENV:-.venv}/bin/python" -m pytest "$@"
