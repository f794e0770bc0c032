#!/usr/bin/env bash
# The CUDA checks behind docs/performance.md, on one GPU, in one go, within a budget (BUDGET_S, default
# 510 s: each part runs for at most its own cap or what is left of the budget, whichever is less, so the
# whole script ends in time by construction; no part writes a model or checkpoint into OUT_DIR):
#   1. tests: the CUDA-only tests (real CUDA-graph capture) with the sampler, training-batch and CUDA-path tests,
#   2. rollout: Qwen3-0.6B shape with random weights, 16 sequences, ours (eager and CUDA graphs) against
#      `generate`, with the decode roofline and kernel launches per decode step,
#   3. rollout_qwen2, rollout_llama: the same against `generate` on the Qwen2.5-0.5B and SmolLM2-135M shapes,
#   4. step, step_graphs: GRPO steps at the default settings with 512-token completions, eager and with CUDA
#      graphs (step time, its split, peak memory allocated and reserved, the prompts' widths),
#   5. cli: the real path a hub model takes, offline: a Qwen3-0.6B-shaped folder loaded by from_pretrained,
#      train_grpo.py (fit check, model.train(), 2 steps, an eval) then python -m eval, with HF_HUB_OFFLINE
#      unset (nothing may reach for the network) and the `kernels` package installed,
#   6. drift: the sampler's log-probs against the training forward's, in bf16, eager and graphed.
# Four files in OUT_DIR, written as it goes: checks.log (every part's output), results.jsonl (each part's
# JSON line the moment the part ends), parts.tsv (part, status, seconds) and summary.txt.
#
#   scripts/cuda_checks.sh [OUT_DIR]               (default OUT_DIR: cuda_checks)
#   PYTHON=python3 scripts/cuda_checks.sh OUT_DIR  (default: .venv/bin/python if there, else python3)
# On the lent GPU machine (docs/performance.md, "Running the GPU checks"): scripts/carry_wheels.sh here,
# then, there, carrying .carry/wheels: PYTHON=python3 scripts/cuda_checks.sh "$OUT"
# It never calls pip with the network. Only when the preflight says a package is missing or too old
# (exit 3), and .carry/wheels (CARRY_DIR) holds wheels, are they installed with pip --no-index
# --no-compile into CARRY_SITE (default /tmp/qwen-gsm8k-grpo-site, outside the repository: only the
# wheels travel); "no CUDA GPU" installs nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-cuda_checks}
BUDGET_S=${BUDGET_S:-510}
start=$SECONDS
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# the image's pytest plugins stay out; the recipe's allocator setting is the one measured
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
carry=${CARRY_DIR:-.carry}
site=${CARRY_SITE:-${TMPDIR:-/tmp}/qwen-gsm8k-grpo-site}
if [ -d "$site" ]; then export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}; fi
"$PYTHON" scripts/preflight.py >/dev/null 2>&1
if [ $? = 3 ] && compgen -G "$carry/wheels/*.whl" >/dev/null && [ ! -d "$site" ]; then
  echo "== installing the carried wheels into $site (pip --no-index --no-compile: no network)"
  pip_log=$(mktemp)
  if ! "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "$carry"/wheels/*.whl \
      >"$pip_log" 2>&1; then
    rm -rf "$site"
    echo "error: the wheels in $carry/wheels do not install on $("$PYTHON" -V 2>&1) here ($(tail -n 1 \
"$pip_log")); run scripts/carry_wheels.sh again with PY_VERSION and PLATFORM of this machine" >&2
    exit 2
  fi
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
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
  # -k: a part that ignores SIGTERM (a wedged CUDA call) is killed 5 s later
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$part_log" | tee -a "$out/checks.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then state=ok; else state="FAILED (exit $rc)"; status=1; fi
  printf '%s\t%s\t%s\n' "$name" "$state" $((SECONDS - t0)) >>"$out/parts.tsv"
  grep '^JSON ' "$part_log" | cut -c6- | sed "s/^{/{\"part\": \"$name\", /" >>"$out/results.jsonl"
  rm -f "$part_log"
}
cli_run() {  # the real path, offline by construction: a model folder through from_pretrained, train(), eval
  local dir
  dir=$(mktemp -d)
  env -u HF_HUB_OFFLINE "$PYTHON" -m models --model $qwen --save_to "$dir/model" --max_new_tokens 8 &&
  env -u HF_HUB_OFFLINE "$PYTHON" train_grpo.py --model_name "$dir/model" --dataset synthetic --max_steps 2 \
    --max_completion_length 64 --eval_every 2 --eval_samples 32 --grpo_output "$dir/grpo" --no_save \
    --device cuda --no_progress &&
  env -u HF_HUB_OFFLINE "$PYTHON" -m eval --model "$dir/model" --dataset synthetic --max_samples 32 \
    --max_new_tokens 64 --output "$dir/eval" --device cuda --no_progress
  local rc=$?
  rm -rf "$dir"
  return $rc
}
qwen=random:Qwen/Qwen3-0.6B
export -f cli_run  # timeout runs programs: the function runs under a bash of its own
export PYTHON qwen
part tests 75 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_sampling.py tests/test_grpo_batch.py \
  tests/test_families.py tests/test_models.py::test_bf16_reference_copy_keeps_the_policy_rotary_frequencies
part rollout 70 "$PYTHON" -m benchmarks.rollout --model $qwen --prompts 4 --num_generations 4 --device cuda \
  --count_launches
part rollout_qwen2 35 "$PYTHON" -m benchmarks.rollout --model random:Qwen/Qwen2.5-0.5B-Instruct --prompts 4 \
  --num_generations 4 --device cuda --repeats 1
part rollout_llama 35 "$PYTHON" -m benchmarks.rollout --model random:HuggingFaceTB/SmolLM2-135M-Instruct \
  --prompts 4 --num_generations 4 --device cuda --repeats 1
# --no_floor: the floor study (a second, op-counted run) is for CPU timings; here it would only eat the cap
part step 90 "$PYTHON" -m benchmarks.step --model $qwen --max_new_tokens 512 --device cuda --warmup 1 --steps 2 \
  --cuda_graphs off --no_floor
part step_graphs 90 "$PYTHON" -m benchmarks.step --model $qwen --max_new_tokens 512 --device cuda --warmup 1 \
  --steps 2 --cuda_graphs on --no_floor
part cli 75 bash -c cli_run
part drift 35 "$PYTHON" -m benchmarks.drift --model $qwen --device cuda
"$PYTHON" -m benchmarks.summary "$out" | tee "$out/summary.txt"
echo "== $((SECONDS - start)) s in all (budget $BUDGET_S s); checks.log, results.jsonl, parts.tsv, summary.txt in $out"
exit $status
