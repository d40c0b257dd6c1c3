#!/usr/bin/env bash
# The length-extrapolation study: train one tiny byte-level LM per encoding on the books corpus
# at one training length, evaluate each by length on the test documents, and draw every curve
# in one plot with a table (ppl_by_length.svg, results.md).
#
#   scripts/lm-sweep.sh                       # train length 128, 300 steps per config
#   STEPS=1000 scripts/lm-sweep.sh            # longer training
#   TRAIN_LENGTH=64 scripts/lm-sweep.sh       # the configs/lm/*-len64.json variants
#
# Environment: DATA (default data/books; fetched if missing), OUT (default
# runs/lm-sweep-<train length>), STEPS (override the configs' steps), LENGTHS (evaluation
# lengths, default 128,...,8192 — lengths that memory or the documents do not allow are
# reported, not dropped), MAX_TOKENS (evaluated tokens per length, default 16384), BACKEND
# (default ndarray), ENCODINGS (space-separated, default the paper's ten), CARGO_FEATURES.
# Re-running resumes: finished runs are skipped, interrupted ones continue from their
# checkpoint, evaluated ones are not evaluated again.
set -euo pipefail
cd "$(dirname "$0")/.."

TRAIN_LENGTH=${TRAIN_LENGTH:-128}
DATA=${DATA:-data/books}
OUT=${OUT:-runs/lm-sweep-$TRAIN_LENGTH}
LENGTHS=${LENGTHS:-128,256,512,1024,2048,4096,8192}
MAX_TOKENS=${MAX_TOKENS:-16384}
BACKEND=${BACKEND:-ndarray}
ENCODINGS=${ENCODINGS:-nope rope t5 alibi kerple_log fire dape_alibi dape_kerple_log dape_fire dapev2_kerple_log}

case "$TRAIN_LENGTH" in
  128) suffix="" ;;
  64) suffix="-len64" ;;
  *) echo "TRAIN_LENGTH must be 128 or 64 (the configs in configs/lm/)" >&2; exit 2 ;;
esac

[ -d "$DATA" ] && [ -n "$(ls -A "$DATA")" ] || scripts/fetch-corpus.sh books "$DATA"

cargo build --release ${CARGO_FEATURES:+--features "$CARGO_FEATURES"}
dape=${DAPE_BIN:-${CARGO_TARGET_DIR:-target}/release/dape}

mkdir -p "$OUT"
step_args=()
[ -n "${STEPS:-}" ] && step_args=(--steps "$STEPS")
runs=()
for e in $ENCODINGS; do
  config=configs/lm/$e$suffix.json
  run=$OUT/$e
  runs+=(--run "$run")
  start=$(date +%s)
  if [ -f "$run/model.mpk" ]; then
    echo "== $e: trained already"
  elif [ -f "$run/config.json" ]; then
    echo "== $e: resuming"
    "$dape" train --config "$config" --data "$DATA" --out "$run" --backend "$BACKEND" \
      --lines 50 --resume "${step_args[@]}"
  else
    echo "== $e: training"
    "$dape" train --config "$config" --data "$DATA" --out "$run" --backend "$BACKEND" \
      --lines 50 "${step_args[@]}"
  fi
  trained=$(date +%s)
  if [ ! -f "$run/eval.json" ]; then
    "$dape" eval --run "$run" --lengths "$LENGTHS" --max-tokens "$MAX_TOKENS" --backend "$BACKEND"
  fi
  echo "$e train_seconds=$((trained - start)) eval_seconds=$(( $(date +%s) - trained ))" \
    >> "$OUT/timings.txt"
done

"$dape" plot "${runs[@]}" --out "$OUT"
