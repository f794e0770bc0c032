#!/usr/bin/env bash
# The CUDA checks behind the README's Speed section, on one GPU, in one go (a few minutes on an H100):
#   1. the CUDA-only tests (real CUDA-graph capture) with the sampler and training-batch tests,
#   2. rollout throughput, Qwen3-0.6B shape with random weights, 16 sequences: ours (eager and CUDA
#      graphs) against `generate`, with the decode roofline,
#   3. GRPO steps at the seed settings with 512-token completions, eager and with CUDA graphs: step
#      time, its split and peak memory (the A10G budget is 20 GB).
# Each part's output goes to OUT_DIR/<part>.log and every benchmark's JSON line to OUT_DIR/results.jsonl.
#
#   scripts/cuda_checks.sh [OUT_DIR]               (default OUT_DIR: cuda_checks)
#   PYTHON=python3 scripts/cuda_checks.sh OUT_DIR  (use an existing environment instead of .venv)
#   PART_TIMEOUT=300 scripts/cuda_checks.sh         (seconds each part may run; default 1800)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-cuda_checks}
if [ -z "${PYTHON:-}" ]; then
  scripts/setup.sh || exit 1
  PYTHON=.venv/bin/python
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} PYTHONUNBUFFERED=1
if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "error: no CUDA GPU visible to $PYTHON; these checks need one (the CPU benchmarks are in the README)" >&2
  exit 2
fi
mkdir -p "$out"
status=0
part() {  # part NAME COMMAND...: run it, keep its log and JSON line, remember a failure and go on
  local name=$1
  shift
  echo "== $name: $*"
  timeout "${PART_TIMEOUT:-1800}" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "== $name FAILED (exit $rc)"; status=1; }
  grep '^JSON ' "$out/$name.log" | cut -c6- >>"$out/results.jsonl"
}
qwen=random:Qwen/Qwen3-0.6B
part tests "$PYTHON" -m pytest -q -rs tests/test_sampling.py tests/test_grpo_batch.py
part rollout "$PYTHON" -m benchmarks.rollout --model $qwen --prompts 4 --num_generations 4 --device cuda
part step "$PYTHON" -m benchmarks.step --model $qwen --max_new_tokens 512 --device cuda --warmup 1 --steps 3
part step_graphs "$PYTHON" -m benchmarks.step --model $qwen --max_new_tokens 512 --device cuda --warmup 1 --steps 3 \
  --cuda_graphs
echo "== results: $out/results.jsonl"
exit $status
