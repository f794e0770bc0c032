#!/usr/bin/env bash
# The CUDA checks behind docs/performance.md, on one GPU, in one go, within an 8-minute budget
# (BUDGET_S, default 480 s: each part runs for at most its own cap or what is left of the budget,
# whichever is less, so the whole script ends in time by construction; nothing large is written):
#   1. the CUDA-only tests (real CUDA-graph capture) with the sampler, training-batch and CUDA-path tests,
#   2. rollout throughput, Qwen3-0.6B shape with random weights, 16 sequences: ours (eager and CUDA
#      graphs) against `generate`, with the decode roofline and kernel launches per decode step,
#   3. the same against `generate` on the Qwen2.5-0.5B and SmolLM2-135M (Llama) shapes (30 s each),
#   4. GRPO steps at the default settings with 512-token completions, eager and with CUDA graphs: step
#      time, its split and peak memory, allocated and reserved (the A10G budget is 24 GB).
# Four files in OUT_DIR, written as it goes: checks.log (every part's output), results.jsonl (each
# part's JSON line the moment the part ends), parts.tsv (part, status, seconds) and summary.txt.
#
#   scripts/cuda_checks.sh [OUT_DIR]               (default OUT_DIR: cuda_checks)
#   PYTHON=python3 scripts/cuda_checks.sh OUT_DIR  (default: .venv/bin/python if there, else python3)
# It never calls pip with the network: a machine without one whose Python lacks a package (preflight
# says which, in one line) gets the wheels from scripts/carry_wheels.sh, run elsewhere; a .carry folder
# (CARRY_DIR) in the repository is installed from with pip --no-index into .carry/site, only then.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-cuda_checks}
BUDGET_S=${BUDGET_S:-480}
start=$SECONDS
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} PYTHONUNBUFFERED=1
carry=${CARRY_DIR:-.carry}  # what scripts/carry_wheels.sh downloaded elsewhere, installed only when needed
if [ -d "$carry/site" ]; then export PYTHONPATH=$(realpath -m "$carry/site")${PYTHONPATH:+:$PYTHONPATH}; fi
if ! "$PYTHON" scripts/preflight.py 2>/dev/null >/dev/null; then
  if compgen -G "$carry/wheels/*.whl" >/dev/null && [ ! -d "$carry/site" ]; then
    echo "== installing the carried wheels into $carry/site (pip --no-index: no network)"
    if ! "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$carry/site" "$carry"/wheels/*.whl \
        >"$carry/pip.log" 2>&1; then
      rm -rf "$carry/site"
      echo "error: the wheels in $carry/wheels do not install on $("$PYTHON" -V 2>&1) here ($(tail -n 1 \
"$carry/pip.log")); run scripts/carry_wheels.sh again with PY_VERSION and PLATFORM of this machine" >&2
      exit 2
    fi
    export PYTHONPATH=$(realpath -m "$carry/site")${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
"$PYTHON" scripts/preflight.py || exit 2
mkdir -p "$out"
: >"$out/results.jsonl"
: >"$out/parts.tsv"
: >"$out/checks.log"
status=0
part_limit() {  # part_limit CAP: the seconds a part may run, CAP or what is left of the budget
  local left=$((BUDGET_S - (SECONDS - start)))
  if [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}
part() {  # part NAME CAP COMMAND...: run it within its limit, keep its output and JSON line, go on after a failure
  local name=$1 limit rc t0=$SECONDS part_log
  limit=$(part_limit "$2")
  shift 2
  if [ "$limit" -lt 10 ]; then
    printf '%s\tSKIPPED (budget spent)\t0\n' "$name" >>"$out/parts.tsv"
    status=1
    return
  fi
  echo "== $name (at most ${limit} s): $*" | tee -a "$out/checks.log"
  part_log=$(mktemp)
  timeout "$limit" "$@" 2>&1 | tee "$part_log" | tee -a "$out/checks.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then state=ok; else state="FAILED (exit $rc)"; status=1; fi
  printf '%s\t%s\t%s\n' "$name" "$state" $((SECONDS - t0)) >>"$out/parts.tsv"
  grep '^JSON ' "$part_log" | cut -c6- | sed "s/^{/{\"part\": \"$name\", /" >>"$out/results.jsonl"
  rm -f "$part_log"
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
  --cuda_graphs off --no_floor
part step_graphs 100 "$PYTHON" -m benchmarks.step --model $qwen --max_new_tokens 512 --device cuda --warmup 1 \
  --steps 2 --cuda_graphs on --no_floor
"$PYTHON" -m benchmarks.summary "$out" | tee "$out/summary.txt"
echo "== $((SECONDS - start)) s in all (budget $BUDGET_S s); checks.log, results.jsonl, parts.tsv, summary.txt in $out"
exit $status
