#!/usr/bin/env bash
# The GPU recipe of docs/quality.md ("Retrieval at 32K on one H200"): a LongNet (configuration/longnet-32k.json),
# the same model with only its 2048-token local branch, and the same model with one dense 32K branch, trained on the
# same streamed pass-key data at contexts of 32768 tokens (8 per step; the first 250 steps on documents of at most
# 512 characters, the next 150 at most 4096), then scored on the same held-out documents (every question 4K-24K
# tokens after its evidence; NEAR=1 also 32-2048).
#   RUNS="longnet local" bash experiments/retrieval/gpu_32k.sh   # these at once on one GPU (7.5 min, docs/quality.md)
#   RUNS=dense MINUTES=6 ...                                      # then the dense reference alone
# Runs: longnet, local, dense, llama (transformers' Llama of the same sizes, SDPA over whole rows: the documents of a
# row see each other, so run it with CURRICULUM= , none), narrow (the preset's width 256 and 8 heads of run 1).
# STEPS (900), CURRICULUM (train.py --default-curriculum; empty: none), MINUTES (--max-train-minutes, 8) set the
# training; TRAIN_LIMIT kills a training still running after that many seconds. Models and logs go to
# $WORK/<run>; the evaluation scores every model found there. With RESULTS set, everything but the weights is
# packed into $RESULTS/results.tgz (evaluation.md and .png beside it), the few files the device tool brings back.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
WORK=${WORK:-outputs/gpu}; STEPS=${STEPS:-900}; RUNS=${RUNS:-longnet local}; WORKERS=${WORKERS:-3}; DOCS=${DOCS:-100}
TRAIN_LIMIT=${TRAIN_LIMIT:-86400}  # seconds; a training still running then is killed (what it logged is kept)
MINUTES=${MINUTES:-8}  # train.py --max-train-minutes: a training still running then stops, is evaluated and saved
CURRICULUM=${CURRICULUM-512:250 4096:150}  # train.py --default-curriculum stages; set but empty: none
mkdir -p "$WORK"
TRAIN=(python3 scripts/train.py --preset longnet-32k --block-size 32768 --stream-default-data
       --per-device-train-batch-size 8 --precision bf16 --learning-rate 2e-3 --adam-beta2 0.95 --warmup-steps 0.05
       --default-min-distance 32 --default-max-distance 20480 --default-passkey-statements 8
       --default-task-weights 1 0 0 --answer-loss-weight 5 --default-validation-documents 16
       --per-device-eval-batch-size 4 --dataloader-num-workers "$WORKERS" --logging-steps 25 --save-steps 1000000
       --max-train-minutes "$MINUTES" --quiet --seed 0)
# shellcheck disable=SC2206  (the stages are words without spaces)
[ -n "$CURRICULUM" ] && TRAIN+=(--default-curriculum $CURRICULUM)
run_arguments() {
  case $1 in
    longnet) ;;
    local) echo "--set segment_lengths=[2048] --set dilation_rates=[1]" ;;
    dense) echo "--set segment_lengths=[32768] --set dilation_rates=[1]" ;;
    llama) echo "--architecture llama" ;;
    narrow) echo "--set hidden_size=256 --set intermediate_size=768 --set num_attention_heads=8 --set num_key_value_heads=8" ;;
    *) echo "unknown run $1" >&2; exit 2 ;;
  esac
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import torch, transformers, triton; print("torch", torch.__version__, "transformers", transformers.__version__, "triton", triton.__version__)'
date -u +%FT%TZ
start=$(date +%s); pids=()
for run in $RUNS; do
  # shellcheck disable=SC2046  (the run's arguments are words without spaces)
  timeout "$TRAIN_LIMIT" "${TRAIN[@]}" --max-steps "$STEPS" $(run_arguments "$run") --output-dir "$WORK/$run" >"$WORK/$run.log" 2>&1 &
  pids+=($!)
done
status=0; for pid in "${pids[@]}"; do wait "$pid" || status=1; done
echo "training ($RUNS, $STEPS steps each, at once) rc=$status $(( $(date +%s) - start )) s"
for run in $RUNS; do echo "--- $run"; grep -E "^\{'loss'" "$WORK/$run.log" | awk 'NR % 8 == 0'; tail -n 8 "$WORK/$run.log"; done

models=(); labels=()
for run in longnet narrow local dense llama; do
  if [ -f "$WORK/$run/training_summary.json" ]; then models+=("$WORK/$run"); labels+=("$run"); fi
done
start=$(date +%s)
python3 scripts/evaluate.py "${models[@]}" --labels "${labels[@]}" --min-distance 4096 --max-distance 24576 \
  --documents "$DOCS" --batch-size 2 --dtype bfloat16 --output-dir "$WORK/evaluation" 2>&1 | grep -v "Loading weights"
echo "evaluation $(( $(date +%s) - start )) s"
if [ -n "${NEAR:-}" ]; then  # the same models on questions inside the local branch: did retrieval form at all?
  python3 scripts/evaluate.py "${models[@]}" --labels "${labels[@]}" --min-distance 32 --max-distance 2048 \
    --documents 10 --batch-size 2 --dtype bfloat16 --output-dir "$WORK/evaluation-near" 2>&1 | grep -A 12 "^Retrieval"
fi
if [ -n "${RESULTS:-}" ]; then
  mkdir -p "$RESULTS"
  (cd "$WORK" && find . -name '*.log' -o -name training_summary.json -o -path './evaluation*/*' | tar czf "$RESULTS/results.tgz" -T -)
  cp "$WORK/evaluation/evaluation.md" "$WORK/evaluation/evaluation.png" "$RESULTS/" 2>/dev/null
fi
