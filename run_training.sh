#!/usr/bin/env bash
# The whole pipeline: SFT -> GRPO -> eval -> plots. Each stage's output feeds the next; the first stage
# that fails stops the run and is named.
#   ./run_training.sh          real recipe: Qwen/Qwen3-0.6B on GSM8K (A10G-class GPU; hub or GSM8K_DIR)
#   ./run_training.sh --tiny   offline preset: built-in tiny model, synthetic problems, CPU, ~10 minutes
#   ./run_training.sh --tiny --smoke   the same stages at toy sizes (seconds): a check that all runs
# Env: OUT (default ./runs/<preset>) holds sft/, grpo/, eval/ and plots/; an existing run there is
# replaced (the preset is a demo; use train_sft.py/train_grpo.py with --resume for long runs).
# DATASET (a data file, a folder with train/test files, or a hub dataset id; README, Your own data) and
# QUESTION_FIELD / ANSWER_FIELD / SOLUTION_FIELD run the stages on your own data (SFT needs solutions).
set -euo pipefail
cd "$(dirname "$0")"
preset=real
smoke=0
for arg in "$@"; do
  case "$arg" in
    --tiny) preset=tiny ;;
    --smoke) smoke=1 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $arg (use --tiny, or nothing for the real recipe)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-./runs/$preset}

scripts/setup.sh
PY=.venv/bin/python
stage() {
  local name=$1; shift
  echo "== [$name] $*"
  local start=$SECONDS
  if ! "$@"; then
    echo "error: stage '$name' failed; see the output above" >&2
    exit 1
  fi
  echo "== [$name] done in $((SECONDS - start))s"
}

if [ "$smoke" = 1 ] && [ "$preset" != tiny ]; then
  echo "error: --smoke goes with --tiny" >&2; exit 2
fi
if [ "$preset" = tiny ]; then
  export HF_HUB_OFFLINE=1
  DATA=(--dataset synthetic)
  # Constant-LR SFT: a cosine-annealed one leaves a sharper, weaker model that GRPO barely moves.
  SFT=(--model_name tiny --full_finetune --max_steps 400 --num_epochs 10 --batch_size 64 --learning_rate 1e-3
       --lr_decay constant --warmup_ratio 0 --eval_samples 300 --eval_max_new_tokens 48 --save_every 1000)
  MORE_SFT_STEPS=640  # the baseline: SFT continued for about as long as GRPO runs
  GRPO=(--max_steps 60 --prompts_per_step 32 --num_generations 8 --micro_batch_size 128
        --max_completion_length 48 --temperature 1.0 --beta 0 --learning_rate 5e-5
        --eval_every 20 --eval_samples 300 --save_every 20)
  EVAL=(--max_new_tokens 48 --batch_size 128)
  if [ "$smoke" = 1 ]; then
    SFT=(--model_name tiny --full_finetune --max_steps 3 --max_samples 64 --batch_size 16 --eval_samples 8
         --eval_max_new_tokens 16)
    MORE_SFT_STEPS=4
    GRPO=(--max_steps 2 --prompts_per_step 2 --num_generations 4 --max_completion_length 16 --beta 0.01
          --eval_every 2 --eval_samples 8)
    EVAL=(--max_new_tokens 16 --max_samples 8)
  fi
else
  DATA=(--dataset gsm8k ${GSM8K_DIR:+--data_dir "$GSM8K_DIR"})
  SFT=(--model_name Qwen/Qwen3-0.6B --num_epochs 3 --batch_size 4)
  GRPO=(--max_steps 500 --eval_every 50 --save_every 50)
  EVAL=(--max_new_tokens 512 --batch_size 64)
fi

if [ -n "${DATASET:-}" ]; then
  DATA=(--dataset "$DATASET")
  for f in QUESTION_FIELD ANSWER_FIELD SOLUTION_FIELD; do
    if [ -n "${!f:-}" ]; then DATA+=("--$(echo "$f" | tr '[:upper:]' '[:lower:]')" "${!f}"); fi
  done
fi
stage reward-selftest $PY -m rewards
# SFT and GRPO print a progress line every tenth of their steps (output is not a terminal here)
stage sft  $PY train_sft.py  "${DATA[@]}" "${SFT[@]}" --sft_output "$OUT/sft" --overwrite
stage grpo $PY train_grpo.py "${DATA[@]}" "${GRPO[@]}" --sft_output "$OUT/sft" --grpo_output "$OUT/grpo" \
  --overwrite
stage eval-sft  $PY -m eval --model "$OUT/sft"  "${DATA[@]}" "${EVAL[@]}" --output "$OUT/eval/sft" --no_progress
stage eval-grpo $PY -m eval --model "$OUT/grpo" "${DATA[@]}" "${EVAL[@]}" --output "$OUT/eval/grpo" --no_progress
models=(sft grpo)
if [ -n "${MORE_SFT_STEPS:-}" ]; then
  # Is it GRPO, or just more training? The same SFT continued for about as long, evaluated the same way.
  rm -rf "$OUT/sft_more" && cp -r "$OUT/sft" "$OUT/sft_more"
  stage sft-more $PY train_sft.py "${DATA[@]}" "${SFT[@]}" --max_steps "$MORE_SFT_STEPS" --sft_output "$OUT/sft_more" \
    --resume
  stage eval-sft-more $PY -m eval --model "$OUT/sft_more" "${DATA[@]}" "${EVAL[@]}" --output "$OUT/eval/sft_more" \
    --no_progress
  models+=(sft_more)
fi
stage plots $PY visualize_logs.py --log_file "$OUT/grpo/grpo_training_logs.jsonl" --output "$OUT/plots"
$PY - "$OUT" "${models[@]}" <<'PYEOF'
import json, sys
out, models = sys.argv[1], sys.argv[2:]
acc = {m: json.load(open(f"{out}/eval/{m}/eval_summary.json")) for m in models}
n = acc["sft"]["num_questions"]
line = f"held-out accuracy after SFT {acc['sft']['accuracy']:.3f} -> after GRPO {acc['grpo']['accuracy']:.3f}"
if "sft_more" in acc:
    line += f" (more SFT instead: {acc['sft_more']['accuracy']:.3f})"
print(f"== result: {line}; {n} problems, greedy; outputs in {out}")
PYEOF
# Is the gain real? The paired comparison on the same problems (bootstrap interval, McNemar's test).
echo "== GRPO against SFT (A = sft, B = grpo)"
$PY -m eval.compare "$OUT/eval/sft" "$OUT/eval/grpo"
if [ -n "${MORE_SFT_STEPS:-}" ]; then
  echo "== GRPO against the equal-time SFT baseline (A = sft_more, B = grpo)"
  $PY -m eval.compare "$OUT/eval/sft_more" "$OUT/eval/grpo"
fi
