#!/usr/bin/env bash
# The length-extrapolation study: train one tiny byte-level LM per encoding on a corpus at one
# training length, evaluate each by length on the test documents, and draw every curve in one
# plot with a table (ppl_by_length.svg, results.md).
#
#   scripts/lm-sweep.sh                       # books, train length 128, the configs' 300 steps
#   STEPS=2000 scripts/lm-sweep.sh            # longer training
#   CORPUS=latex SEED=1 scripts/lm-sweep.sh   # another corpus, another seed
#   TRAIN_LENGTH=64 scripts/lm-sweep.sh       # the configs/lm/*-len64.json variants
#
# Environment: CORPUS (books, latex or code; default books), DATA (default data/$CORPUS;
# fetched if missing), OUT (default runs/lm-sweep-<train length>, or
# runs/lm-sweep-<corpus>-<train length> for another corpus), SEED (default 0: the seed of the
# weights and the window order, not of the split; a run of seed N > 0 is named <encoding>-seedN),
# STEPS (override the configs' steps), CHECKPOINT_EVERY (steps between checkpoints and
# validation rounds, overriding the configs'), LENGTHS (evaluation lengths, default 128,...,8192 —
# lengths that memory or the documents do not allow are reported, not dropped), MAX_TOKENS
# (evaluated tokens per length, default 16384), BACKEND (default ndarray), ENCODINGS
# (space-separated, default the thirteen of the study), CARGO_FEATURES, DAPE_BIN (a built dape
# binary: skips the release build), PLOT (default 1; 0 skips the combined plot).
# Re-running resumes: finished runs are skipped, interrupted ones continue from their
# checkpoint, evaluated ones are not evaluated again.
set -euo pipefail
cd "$(dirname "$0")/.."

TRAIN_LENGTH=${TRAIN_LENGTH:-128}
CORPUS=${CORPUS:-books}
DATA=${DATA:-data/$CORPUS}
if [ "$CORPUS" = books ]; then
  OUT=${OUT:-runs/lm-sweep-$TRAIN_LENGTH}
else
  OUT=${OUT:-runs/lm-sweep-$CORPUS-$TRAIN_LENGTH}
fi
SEED=${SEED:-0}
LENGTHS=${LENGTHS:-128,256,512,1024,2048,4096,8192}
MAX_TOKENS=${MAX_TOKENS:-16384}
BACKEND=${BACKEND:-ndarray}
ENCODINGS=${ENCODINGS:-nope rope rope_randomized t5 alibi kerple_log fire dape_alibi dape_kerple_log dape_fire dapev2_kerple_log fox dape_fox}

case "$TRAIN_LENGTH" in
  128) suffix="" ;;
  64) suffix="-len64" ;;
  *) echo "TRAIN_LENGTH must be 128 or 64 (the configs in configs/lm/)" >&2; exit 2 ;;
esac

[ -f "$DATA/.complete" ] || scripts/fetch-corpus.sh "$CORPUS" "$DATA"

if [ -z "${DAPE_BIN:-}" ]; then
  cargo build --release ${CARGO_FEATURES:+--features "$CARGO_FEATURES"}
fi
dape=${DAPE_BIN:-${CARGO_TARGET_DIR:-target}/release/dape}

mkdir -p "$OUT"
step_args=(--seed "$SEED")
[ -n "${STEPS:-}" ] && step_args+=(--steps "$STEPS")
[ -n "${CHECKPOINT_EVERY:-}" ] && step_args+=(--checkpoint-every "$CHECKPOINT_EVERY")
runs=()
for e in $ENCODINGS; do
  config=configs/lm/$e$suffix.json
  name=$e
  [ "$SEED" != 0 ] && name=$e-seed$SEED
  run=$OUT/$name
  runs+=(--run "$run")
  start=$(date +%s)
  if [ -f "$run/model.mpk" ]; then
    echo "== $name: trained already"
  elif [ -f "$run/config.json" ]; then
    echo "== $name: resuming"
    "$dape" train --config "$config" --data "$DATA" --out "$run" --backend "$BACKEND" \
      --lines 50 --resume "${step_args[@]}"
  else
    echo "== $name: training"
    "$dape" train --config "$config" --data "$DATA" --out "$run" --backend "$BACKEND" \
      --lines 50 "${step_args[@]}"
  fi
  trained=$(date +%s)
  if [ ! -f "$run/eval.json" ]; then
    "$dape" eval --run "$run" --lengths "$LENGTHS" --max-tokens "$MAX_TOKENS" --backend "$BACKEND"
  fi
  echo "$name train_seconds=$((trained - start)) eval_seconds=$(( $(date +%s) - trained ))" \
    >> "$OUT/timings.txt"
done

[ "${PLOT:-1}" = 0 ] || "$dape" plot "${runs[@]}" --out "$OUT"
