#!/usr/bin/env bash
# Side-by-side speed and memory of `dape bench` and the PyTorch eager reference
# (../shared/bench/torch_ref.py, or $TORCH_REF) on the same machine, alternating the two for each
# measurement, then a markdown table with the ratios ours / PyTorch.
#
#   scripts/bench-vs-pytorch.sh                 # full grid (slow: long evaluation lengths)
#   QUICK=1 scripts/bench-vs-pytorch.sh         # train at 128 and eval at 1024 only
#
# Environment: BACKEND (default ndarray), TORCH_DEVICE is not used (torch_ref runs on the CPU),
# ENCODINGS (torch_ref names, default "alibi kerple dape-kerple"), EVAL_LENGTHS (default
# "1024 4096 8192 16384"), TRAIN_STEPS (default 10), OUT (default runs/bench), TIMEOUT per
# measurement in seconds (default 1800), MEM_LIMIT_GB (address-space limit of each measured
# process, default 20, so that an out-of-memory run fails cleanly instead of taking the machine
# down), CARGO_FEATURES, TABLE_ONLY (rewrite $OUT/table.md from $OUT/results.jsonl, e.g.
# after adding a measurement by hand, without measuring). Needs the torch==2.9.0 venv of
# scripts/setup-libtorch.sh. A measurement that fails (out of memory, killed, timed out) is
# recorded as failed with its exit status, not dropped.
set -euo pipefail
cd "$(dirname "$0")/.."

BACKEND=${BACKEND:-ndarray}
ENCODINGS=${ENCODINGS:-alibi kerple dape-kerple}
EVAL_LENGTHS=${EVAL_LENGTHS:-1024 4096 8192 16384}
TRAIN_STEPS=${TRAIN_STEPS:-10}
OUT=${OUT:-runs/bench}
TIMEOUT=${TIMEOUT:-1800}
MEM_LIMIT_GB=${MEM_LIMIT_GB:-20}
TORCH_REF=${TORCH_REF:-../shared/bench/torch_ref.py}
if [ -n "${QUICK:-}" ]; then EVAL_LENGTHS=1024; TRAIN_STEPS=3; fi
results=$OUT/results.jsonl
threads=$(nproc)

if [ -z "${TABLE_ONLY:-}" ]; then
[ -f "$TORCH_REF" ] || { echo "no PyTorch reference at $TORCH_REF (set TORCH_REF)" >&2; exit 2; }
eval "$(scripts/setup-libtorch.sh)"
cargo build --release ${CARGO_FEATURES:+--features "$CARGO_FEATURES"} >&2
dape=${DAPE_BIN:-${CARGO_TARGET_DIR:-target}/release/dape}
mkdir -p "$OUT"
: > "$results"

# run NAME CMD...: append the JSON line of CMD, or a failure record.
run() {
  local name=$1; shift
  local line status=0
  line=$(ulimit -v $((MEM_LIMIT_GB * 1024 * 1024)) && timeout "$TIMEOUT" "$@" \
    2>"$OUT/last-stderr.txt" | tail -n 1) || status=$?
  if [ "$status" -eq 0 ] && [ "${line:0:1}" = "{" ]; then
    echo "$line" >> "$results"
  else
    echo "{\"impl\": \"$name\", \"failed\": $status, \"args\": \"$*\"}" >> "$results"
    echo "  $name failed (exit $status): $(tail -n 2 "$OUT/last-stderr.txt" | tr '\n' ' ')" >&2
  fi
  tail -n 1 "$results" >&2
}

for enc in $ENCODINGS; do
  echo "== train $enc, length 128, batch 8" >&2
  run dape "$dape" bench --backend "$BACKEND" --mode train --encoding "$enc" --length 128 \
    --batch 8 --steps "$TRAIN_STEPS"
  run pytorch-eager python "$TORCH_REF" --mode train --encoding "$enc" --length 128 --batch 8 \
    --steps "$TRAIN_STEPS" --threads "$threads"
  for L in $EVAL_LENGTHS; do
    # One step from 8192 on; no warm-up from 16384 on (one step takes minutes there, so what a
    # warm-up would absorb is negligible, and it would double the time).
    steps=3; [ "$L" -ge 8192 ] && steps=1
    warmup=1; [ "$L" -ge 16384 ] && warmup=0
    echo "== eval $enc, length $L, batch 1" >&2
    run dape "$dape" bench --backend "$BACKEND" --mode eval --encoding "$enc" --length "$L" \
      --batch 1 --steps "$steps" --warmup "$warmup"
    run pytorch-eager python "$TORCH_REF" --mode eval --encoding "$enc" --length "$L" \
      --batch 1 --steps "$steps" --threads "$threads"
  done
done
fi

python3 - "$results" "$BACKEND" "$threads" > "$OUT/table.md" <<'PY'
import json, sys, platform
path, backend, threads = sys.argv[1], sys.argv[2], sys.argv[3]
rows = [json.loads(l) for l in open(path) if l.strip()]
ours = [r for r in rows if r.get("impl") == "dape"]
ref = [r for r in rows if r.get("impl") == "pytorch-eager"]
alias = {"kerple": "kerple_log", "dape-kerple": "dape_kerple_log", "dape-alibi": "dape_alibi",
         "dape-fire": "dape_fire"}
def key(r):
    return (alias.get(r["encoding"], r["encoding"]), r["mode"], r["length"], r["batch"])
done = {key(r): r for r in ref if "failed" not in r}
print(f"Machine: {platform.processor() or platform.machine()}, {threads} threads; dape on {backend}, "
      "PyTorch 2.9.0 eager on the CPU; model of torch_ref.py (4 layers, d_model 256, 8 heads, "
      "vocab 256).\n")
print("| mode | encoding | length | batch | dape tok/s | PyTorch tok/s | ratio | dape peak RSS MiB | PyTorch peak RSS MiB | RSS ratio |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for r in ours:
    if "failed" in r:
        continue
    t = done.get(key(r))
    f = lambda v, p=1: f"{v:.{p}f}" if isinstance(v, (int, float)) else "—"
    tt = t["tokens_per_second"] if t else None
    tr = t["peak_rss_mib"] if t else None
    ratio = f"{r['tokens_per_second'] / tt:.2f}" if tt else "ref failed"
    rss = f"{r['peak_rss_mib'] / tr:.2f}" if (tr and r.get("peak_rss_mib")) else "—"
    print(f"| {r['mode']} | {key(r)[0]} | {r['length']} | {r['batch']} | {f(r['tokens_per_second'])} | "
          f"{f(tt)} | {ratio} | {f(r.get('peak_rss_mib'))} | {f(tr)} | {rss} |")
fails = [r for r in rows if "failed" in r]
if fails:
    print("\nFailed measurements (a failed allocation under the MEM_LIMIT_GB address-space limit "
          "exits with 1 from Python or 134 (abort) from Rust; 137: killed; 124: timed out):\n")
    for r in fails:
        print(f"- {r['impl']}: exit {r['failed']}: `{r['args']}`")
PY
cat "$OUT/table.md"
