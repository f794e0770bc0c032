#!/usr/bin/env bash
# The whole pipeline: SFT -> GRPO -> eval -> plots. Each stage's output feeds the next; the first stage
# that fails stops the run and is named.
#   ./run_training.sh          real recipe: Qwen/Qwen3-0.6B on GSM8K (A10G-class GPU; hub or GSM8K_DIR)
#   ./run_training.sh --tiny   offline preset: built-in tiny model, synthetic problems, CPU, ~10 minutes:
#                              SFT on worked solutions of six kinds of problem, GRPO on only the final
#                              answers of a seventh, against SFT continued as long (README, the demo)
#   ./run_training.sh --tiny --smoke   the same stages at toy sizes (seconds): a check that all runs
#   ./run_training.sh --rehearse       the real recipe's stages, flags and GSM8K files on a CPU, offline, in
#                              under 10 minutes on 2 cores, leaving every file the real run leaves. It differs
#                              from the real run in exactly these ways:
#                              - the model: random weights of Qwen3-0.6B's shape and vocabulary (28 layers,
#                                151,936 tokens), first saved as a folder (base/) and then loaded by
#                                from_pretrained as the downloaded hub model is; its tokenizer is the built-in
#                                tiny one (GSM8K prompts of 87-380 tokens, ~100-250 with Qwen3's own), or
#                                Qwen3's own where the hub cache holds it; the answers score 0;
#                              - the device: the CPU in fp32 (the real run: CUDA, bf16 autocast, CUDA graphs,
#                                the memory fit check);
#                              - SFT: 2 steps of 2 examples of at most 256 tokens (real: 3 epochs of 4, 512),
#                                its eval 4 problems of 16 tokens (real: 100 of 256);
#                              - GRPO: 2 steps of 2 prompts x 2 completions of 32 tokens (real: 500 steps of
#                                4 x 4 of 512), eval and checkpoint at step 2 on 4 problems (real: every 50
#                                steps, 100 problems);
#                              - the final evals: 8 problems of 32 tokens (real: all 1,319 of 512).
#                              GSM8K from GSM8K_DIR, else ../shared/data/gsm8k.
# Env: OUT (default ./runs/<preset>) holds sft/, grpo/, eval/ and plots/; an existing run there is
# replaced (the preset is a demo; use train_sft.py/train_grpo.py with --resume for long runs).
# DATASET (a data file, a folder with train/test files, or a hub dataset id; docs/data.md) and
# QUESTION_FIELD / ANSWER_FIELD / SOLUTION_FIELD run the stages on your own data (SFT needs solutions).
# SEED (default 42) seeds SFT's and GRPO's data order and sampling; the same SEED on the same machine
# gives the same figures to the last digit, another SEED (or machine) shows the run-to-run spread.
set -euo pipefail
cd "$(dirname "$0")"
preset=real
smoke=0
for arg in "$@"; do
  case "$arg" in
    --tiny) preset=tiny ;;
    --rehearse) preset=rehearse ;;
    --smoke) smoke=1 ;;
    -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
    *) echo "error: unknown argument $arg (use --tiny, --rehearse, or nothing for the real recipe)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-./runs/$preset}
SEED=${SEED:-42}
case "$SEED" in
  ''|*[!0-9]*) echo "error: SEED must be a whole number >= 0 (got '$SEED')" >&2; exit 2 ;;
esac

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
  # SFT has worked solutions for six kinds of problem; a seventh, new kind has only final answers.
  # GRPO trains on final answers of all seven (a kind named k times is drawn k times as often: the new
  # kind is half the prompts) and is scored as it trains on the new kind and on the six seen ones (two
  # curves in its plots: eval_new_kind_accuracy, eval_seen_accuracy); the final evals score both again.
  SEEN=add,sub,mul,div,mul_sub,wage
  SFT_DATA=(--dataset "synthetic:$SEEN")
  GRPO_DATA=(--dataset "synthetic:$SEEN,times_more,times_more,times_more,times_more,times_more,times_more"
             --eval_dataset new_kind=synthetic:times_more --eval_dataset "seen=synthetic:$SEEN")
  EVAL_DATA=(--dataset synthetic:times_more)
  # Constant-LR SFT: a cosine-annealed one leaves a sharper, weaker model that GRPO barely moves.
  SFT=(--model_name tiny --finetune full --max_steps 400 --num_epochs 10 --batch_size 64 --learning_rate 1e-3
       --lr_decay constant --warmup_ratio 0 --eval_samples 300 --eval_max_new_tokens 48 --save_every 1000)
  # The baseline: the SFT model trained on for MORE_SFT_STEPS more steps (at least GRPO's wall time) on
  # every worked solution there is, at its own best learning rate from the same search as GRPO's
  MORE_SFT_STEPS=300
  MORE_SFT_LR=8e-3
  # learning rates from the same x2 grid search, widened until the best was inside it (docs/demo.md):
  # GRPO's the best on new and seen kinds together, the baseline's its best on the new kind alone
  GRPO=(--max_steps 150 --prompts_per_step 32 --num_generations 8 --micro_batch_size 128
        --max_completion_length 48 --temperature 1.0 --beta 0 --learning_rate 1e-4
        --eval_every 50 --eval_samples 300 --save_every 50)
  EVAL=(--max_new_tokens 48 --batch_size 128)
  if [ "$smoke" = 1 ]; then
    SFT=(--model_name tiny --finetune full --max_steps 3 --max_samples 64 --batch_size 16 --eval_samples 8
         --eval_max_new_tokens 16)
    MORE_SFT_STEPS=4
    GRPO=(--max_steps 2 --prompts_per_step 2 --num_generations 4 --max_completion_length 16 --beta 0.01
          --eval_every 2 --eval_samples 8)
    EVAL=(--max_new_tokens 16 --max_samples 8)
  fi
elif [ "$preset" = rehearse ]; then
  GSM8K_DIR=${GSM8K_DIR:-../shared/data/gsm8k}
  if [ ! -f "$GSM8K_DIR/train.jsonl" ] || [ ! -f "$GSM8K_DIR/test.jsonl" ]; then
    echo "error: --rehearse reads GSM8K's files: set GSM8K_DIR to a folder with train.jsonl and test.jsonl" >&2
    exit 2
  fi
  # the real recipe's stages, flags and data; only the sizes the help text names are cut (and the CPU)
  SFT_DATA=(--dataset gsm8k --data_dir "$GSM8K_DIR")
  GRPO_DATA=("${SFT_DATA[@]}")
  EVAL_DATA=("${SFT_DATA[@]}")
  BASE=(--model random:Qwen/Qwen3-0.6B --save_to "$OUT/base")
  SFT=(--model_name "$OUT/base" --num_epochs 3 --batch_size 2 --max_steps 2 --max_length 256 --eval_samples 4
       --eval_max_new_tokens 16 --device cpu)
  GRPO=(--max_steps 2 --eval_every 2 --save_every 2 --prompts_per_step 2 --num_generations 2
        --max_completion_length 32 --eval_samples 4 --device cpu)
  EVAL=(--max_new_tokens 32 --batch_size 64 --max_samples 8 --device cpu)
else
  SFT_DATA=(--dataset gsm8k ${GSM8K_DIR:+--data_dir "$GSM8K_DIR"})
  GRPO_DATA=("${SFT_DATA[@]}")
  EVAL_DATA=("${SFT_DATA[@]}")
  SFT=(--model_name Qwen/Qwen3-0.6B --num_epochs 3 --batch_size 4)
  GRPO=(--max_steps 500 --eval_every 50 --save_every 50)
  EVAL=(--max_new_tokens 512 --batch_size 64)
  # rollouts and backward passes of varying lengths fragment the caching allocator: growable segments
  # return that memory (the A10G's 22.5 GiB are tight at the longest micro-batch)
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
fi

if [ -n "${DATASET:-}" ]; then
  SFT_DATA=(--dataset "$DATASET")
  for f in QUESTION_FIELD ANSWER_FIELD SOLUTION_FIELD; do
    if [ -n "${!f:-}" ]; then SFT_DATA+=("--$(echo "$f" | tr '[:upper:]' '[:lower:]')" "${!f}"); fi
  done
  GRPO_DATA=("${SFT_DATA[@]}")
  EVAL_DATA=("${SFT_DATA[@]}")
fi
# eval/<model>: the held-out problems that count (the new kind in the demo); eval/<model>-seen: SFT's
# kinds, when they differ (does GRPO on the new kind cost the kinds SFT learned anything?)
seen=0
if [ "${SFT_DATA[*]}" != "${EVAL_DATA[*]}" ]; then seen=1; fi
evaluate() {  # evaluate <model>
  stage "eval-$1" $PY -m eval --model "$OUT/$1" "${EVAL_DATA[@]}" "${EVAL[@]}" --output "$OUT/eval/$1" --no_progress
  if [ "$seen" = 1 ]; then
    stage "eval-$1-seen" $PY -m eval --model "$OUT/$1" "${SFT_DATA[@]}" "${EVAL[@]}" --output "$OUT/eval/$1-seen" \
      --no_progress
  fi
}
stage reward-selftest $PY -m rewards
if [ -n "${BASE:-}" ]; then  # the rehearsal's stand-in for the hub download: a model folder
  rm -rf "$OUT/base"
  stage base $PY -m models "${BASE[@]}" "${SFT_DATA[@]}" --max_new_tokens 8
fi
# SFT and GRPO print a progress line every tenth of their steps (output is not a terminal here)
stage sft  $PY train_sft.py  "${SFT_DATA[@]}" "${SFT[@]}" --seed "$SEED" --sft_output "$OUT/sft" --overwrite
stage grpo $PY train_grpo.py "${GRPO_DATA[@]}" "${GRPO[@]}" --seed "$SEED" --sft_output "$OUT/sft" \
  --grpo_output "$OUT/grpo" --overwrite
evaluate sft
evaluate grpo
models=(sft grpo)
if [ -n "${MORE_SFT_STEPS:-}" ]; then
  # Is it GRPO, or just more training? The SFT model trained on, on all the worked solutions there are,
  # for at least as long as GRPO ran (both stage times are printed), evaluated the same way.
  stage sft-more $PY train_sft.py "${SFT_DATA[@]}" "${SFT[@]}" --model_name "$OUT/sft" --max_steps "$MORE_SFT_STEPS" \
    ${MORE_SFT_LR:+--learning_rate "$MORE_SFT_LR"} --seed "$SEED" --sft_output "$OUT/sft_more" --overwrite
  evaluate sft_more
  models+=(sft_more)
fi
stage plots $PY visualize_logs.py --log_file "$OUT/grpo/grpo_training_logs.jsonl" --output "$OUT/plots"
$PY - "$OUT" "${models[@]}" <<'PYEOF'
import json, os, sys
out, models = sys.argv[1], sys.argv[2:]
summary = {name: json.load(open(f"{out}/eval/{name}/eval_summary.json")) for name in os.listdir(f"{out}/eval")}
acc = {name: s["accuracy"] for name, s in summary.items()}
n, seen = summary["sft"]["num_questions"], "sft-seen" in acc
line = f"held-out accuracy after SFT {acc['sft']:.3f} -> after GRPO {acc['grpo']:.3f}"
if "sft_more" in acc:
    line += f" (more SFT instead: {acc['sft_more']:.3f})"
print(f"== result: {line}; {n} problems, greedy; outputs in {out}")
if seen:
    label = {"sft": "after SFT", "grpo": "after GRPO", "sft_more": "more SFT instead (baseline)"}
    print(f"   {'accuracy, greedy':<30} {'new kind (answers only)':>24} {'seen kinds (solutions)':>24}")
    for m in models:
        print(f"   {label[m]:<30} {acc[m]:>24.3f} {acc[m + '-seen']:>24.3f}")
if "sft_more" in acc:  # the baseline's better checkpoint on GRPO's held-out problems: where it started, or where it ended
    best = max(("sft_more", "sft"), key=lambda m: acc[m])
    open(f"{out}/baseline_checkpoint", "w").write(best + "\n")
PYEOF
# Is the gain real? The paired comparison on the same problems (bootstrap interval, McNemar's test).
echo "== GRPO against SFT (A = sft, B = grpo)"
$PY -m eval.compare "$OUT/eval/sft" "$OUT/eval/grpo"
if [ -n "${MORE_SFT_STEPS:-}" ]; then
  best=$(cat "$OUT/baseline_checkpoint")
  echo "== GRPO against the equal-time SFT baseline, its better checkpoint (A = $best, B = grpo)"
  $PY -m eval.compare "$OUT/eval/$best" "$OUT/eval/grpo"
fi
if [ "$seen" = 1 ]; then
  echo "== Did GRPO on the new kind cost the seen kinds anything? (A = sft, B = grpo, seen kinds)"
  $PY -m eval.compare "$OUT/eval/sft-seen" "$OUT/eval/grpo-seen"
fi
