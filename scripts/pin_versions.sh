#!/usr/bin/env bash
# Refresh constraints.txt on purpose, never by accident: install requirements*.txt's loose ranges into a
# fresh venv (.venv-pins), run the whole suite there (CI's command: the slow tests included), and only
# when it passes write that venv's exact versions into constraints.txt with the date and the suite's
# closing line. Review `git diff constraints.txt`, then commit it. A failing suite leaves it untouched.
#
#   scripts/pin_versions.sh            (extra args go to pytest, e.g. -x)
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV=.venv-pins
rm -rf "$VENV"
PINS=loose scripts/setup.sh
log=$(mktemp)
if ! VENV=$VENV scripts/test.sh -q -m "slow or not slow" "$@" | tee "$log"; then
  echo "error: the suite failed on the loose versions; constraints.txt is unchanged (see $log)" >&2
  exit 1
fi
closing=$(grep -E "[0-9]+ passed" "$log" | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//')
{
  sed -n '1,4p' constraints.txt
  echo "# suite: $(date -u +%F), $("$VENV/bin/python" -V), torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'), $closing"
  "$VENV/bin/python" -m pip freeze --exclude-editable 2>/dev/null | grep -v -i -E "^(torch|qwen-gsm8k-grpo)=="
} >constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt rewritten from $VENV ($closing); review git diff constraints.txt and commit it"
