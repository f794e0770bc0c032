#!/usr/bin/env bash
# The CUDA checks behind docs/performance.md, on one GPU, in one go, within an 8-minute budget
# (BUDGET_S, default 480 s: each part runs for at most its own cap or what is left of the budget,
# whichever is less, so the whole script ends in time by construction; nothing large is written):
#   1. the CUDA-only tests (real CUDA-graph capture) with the sampler, training-batch and CUDA-path tests,
#   2. rollout throughput, Qwen3-0.6B shape with random weights, 16 sequences: ours (eager and CUDA
#      graphs) against `generate`, with the decode roofline and kernel launches per decode step,
#   3. the same against `generate` on the Qwen2.5-0.5B and SmolLM2-135M (Llama) shapes (30 s each),
#   4. GRPO steps at the seed settings with 512-token completions, eager and with CUDA graphs: step
#      time, its split and peak memory, allocated and reserved (the A10G budget is 24 GB).
# Each part's output goes to OUT_DIR/<part>.log, its JSON line to OUT_DIR/<part>.json (all of them in
# OUT_DIR/results.jsonl), and one summary table is printed at the end.
#
#   scripts/cuda_checks.sh [OUT_DIR]               (default OUT_DIR: cuda_checks)
#   PYTHON=python3 scripts/cuda_checks.sh OUT_DIR  (use an existing environment instead of .venv)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-cuda_checks}
BUDGET_S=${BUDGET_S:-480}
start=$SECONDS
if [ -z "${PYTHON:-}" ]; then
  scripts/setup.sh || exit 1
  PYTHON=.venv/bin/python
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} PYTHONUNBUFFERED=1
if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "error: no CUDA GPU visible to $PYTHON; these checks need one (the CPU benchmarks are in docs/performance.md)" >&2
  exit 2
fi
mkdir -p "$out"
: >"$out/results.jsonl"
: >"$out/parts.tsv"
status=0
part_limit() {  # part_limit CAP: the seconds a part may run, CAP or what is left of the budget
  local left=$((BUDGET_S - (SECONDS - start)))
  if [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}
part() {  # part NAME CAP COMMAND...: run it within its limit, keep its log and JSON line, go on after a failure
  local name=$1 limit rc t0=$SECONDS
  limit=$(part_limit "$2")
  shift 2
  if [ "$limit" -lt 10 ]; then
    printf '%s\tSKIPPED (budget spent)\t0\n' "$name" >>"$out/parts.tsv"
    status=1
    return
  fi
  echo "== $name (at most ${limit} s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then state=ok; else state="FAILED (exit $rc)"; status=1; fi
  printf '%s\t%s\t%s\n' "$name" "$state" $((SECONDS - t0)) >>"$out/parts.tsv"
  grep '^JSON ' "$out/$name.log" | cut -c6- | tee "$out/$name.json" >>"$out/results.jsonl"
}
qwen=random:Qwen/Qwen3-0.6B
part tests 120 "$PYTHON" -m pytest -q -rs tests/test_sampling.py tests/test_grpo_batch.py tests/test_families.py \
  tests/test_models.py::test_bf16_reference_copy_keeps_the_policy_rotary_frequencies
part rollout 100 "$PYTHON" -m benchmarks.rollout --model $qwen --prompts 4 --num_generations 4 --device cuda \
  --count_launches
part rollout_qwen2 30 "$PYTHON" -m benchmarks.rollout --model random:Qwen/Qwen2.5-0.5B-Instruct --prompts 4 \
  --num_generations 4 --device cuda
part rollout_llama 30 "$PYTHON" -m benchmarks.rollout --model random:HuggingFaceTB/SmolLM2-135M-Instruct \
  --prompts 4 --num_generations 4 --device cuda
# --no_floor: the floor study (a second, op-counted run) is for CPU timings; here it would only eat the cap
part step 100 "$PYTHON" -m benchmarks.step --model $qwen --max_new_tokens 512 --device cuda --warmup 1 --steps 2 \
  --no_floor
part step_graphs 100 "$PYTHON" -m benchmarks.step --model $qwen --max_new_tokens 512 --device cuda --warmup 1 \
  --steps 2 --cuda_graphs --no_floor
"$PYTHON" -m benchmarks.summary "$out"
echo "== $((SECONDS - start)) s in all (budget $BUDGET_S s); logs and JSON lines in $out"
exit $status
