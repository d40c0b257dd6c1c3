#!/usr/bin/env bash
# Side-by-side speed and memory of `dape bench` and the PyTorch reference
# (../shared/bench/torch_ref.py, or $TORCH_REF) in its three forms — eager, SDPA
# (`F.scaled_dot_product_attention`, what a PyTorch user writes today; not for DAPE, whose MLP
# reads the logits) and `torch.compile` — on the same machine, one process after the other for
# each measurement, then a markdown table with the ratios ours / each peer.
#
#   scripts/bench-vs-pytorch.sh                 # full grid (slow: long evaluation lengths)
#   QUICK=1 scripts/bench-vs-pytorch.sh         # train at 128 x 8 and eval at 2048 only
#
# Environment: BACKEND (default ndarray), ENCODINGS (torch_ref names, default "alibi kerple
# dape-kerple"), TRAIN_SHAPES (length x batch, default "128x8 512x4"), EVAL_LENGTHS (default
# "1024 2048 4096 8192 16384"), PEERS (default "eager sdpa compile"), TRAIN_STEPS (default 10),
# OUT (default runs/bench), TIMEOUT per measurement in seconds (default 1800), MEM_LIMIT_GB
# (address-space limit of each measured process, default 20, so that an out-of-memory run fails
# cleanly instead of taking the machine down), CARGO_FEATURES, TABLE_ONLY (rewrite
# $OUT/table.md from $OUT/results.jsonl without measuring), DAPE_BIN (a built dape binary:
# skips the release build), REPEATS (default 1: each measurement, ours and the peers', is taken
# that many times, round after round, and the table gives the median with the range in
# brackets: on a shared VM one run can be 20-40% off). Needs the torch==2.9.0 venv of
# scripts/setup-libtorch.sh (and a C++ compiler for the compiled peer). A measurement that fails
# (out of memory, killed, timed out) is recorded as failed with its exit status, not dropped.
set -euo pipefail
cd "$(dirname "$0")/.."

BACKEND=${BACKEND:-ndarray}
ENCODINGS=${ENCODINGS:-alibi kerple dape-kerple}
TRAIN_SHAPES=${TRAIN_SHAPES:-128x8 512x4}
EVAL_LENGTHS=${EVAL_LENGTHS:-1024 2048 4096 8192 16384}
PEERS=${PEERS:-eager sdpa compile}
TRAIN_STEPS=${TRAIN_STEPS:-10}
REPEATS=${REPEATS:-1}
OUT=${OUT:-runs/bench}
TIMEOUT=${TIMEOUT:-1800}
MEM_LIMIT_GB=${MEM_LIMIT_GB:-20}
TORCH_REF=${TORCH_REF:-../shared/bench/torch_ref.py}
if [ -n "${QUICK:-}" ]; then TRAIN_SHAPES=128x8; EVAL_LENGTHS=2048; TRAIN_STEPS=3; fi
results=$OUT/results.jsonl
threads=$(nproc)

if [ -z "${TABLE_ONLY:-}" ]; then
[ -f "$TORCH_REF" ] || { echo "no PyTorch reference at $TORCH_REF (set TORCH_REF)" >&2; exit 2; }
eval "$(scripts/setup-libtorch.sh)"
# DAPE_BIN: a dape binary built already (no build then).
if [ -z "${DAPE_BIN:-}" ]; then
  cargo build --release ${CARGO_FEATURES:+--features "$CARGO_FEATURES"} >&2
fi
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

# peers ENC ARGS...: torch_ref.py in each form of $PEERS (SDPA only where it applies).
peers() {
  local enc=$1; shift
  for peer in $PEERS; do
    case $peer in
      eager) run pytorch-eager python "$TORCH_REF" --encoding "$enc" "$@" --threads "$threads" ;;
      sdpa) case $enc in dape-*) ;; *)
        run pytorch-sdpa-eager python "$TORCH_REF" --encoding "$enc" "$@" --threads "$threads" --sdpa ;;
        esac ;;
      compile) run pytorch-compile python "$TORCH_REF" --encoding "$enc" "$@" --threads "$threads" --compile ;;
      *) echo "unknown peer $peer (expected eager, sdpa or compile)" >&2; exit 2 ;;
    esac
  done
}

for enc in $ENCODINGS; do
  for shape in $TRAIN_SHAPES; do
    L=${shape%x*}; N=${shape#*x}
    for rep in $(seq "$REPEATS"); do
      echo "== train $enc, length $L, batch $N (round $rep of $REPEATS)" >&2
      run dape "$dape" bench --backend "$BACKEND" --mode train --encoding "$enc" --length "$L" \
        --batch "$N" --steps "$TRAIN_STEPS"
      peers "$enc" --mode train --length "$L" --batch "$N" --steps "$TRAIN_STEPS"
    done
  done
  for L in $EVAL_LENGTHS; do
    # One step from 8192 on; no warm-up from 16384 on (one step takes minutes there, so what a
    # warm-up would absorb is negligible, and it would double the time).
    steps=3; [ "$L" -ge 8192 ] && steps=1
    warmup=1; [ "$L" -ge 16384 ] && warmup=0
    for rep in $(seq "$REPEATS"); do
      echo "== eval $enc, length $L, batch 1 (round $rep of $REPEATS)" >&2
      run dape "$dape" bench --backend "$BACKEND" --mode eval --encoding "$enc" --length "$L" \
        --batch 1 --steps "$steps" --warmup "$warmup"
      peers "$enc" --mode eval --length "$L" --batch 1 --steps "$steps"
    done
  done
done
fi

python3 - "$results" "$BACKEND" "$threads" > "$OUT/table.md" <<'PY'
import json, sys, platform
path, backend, threads = sys.argv[1], sys.argv[2], sys.argv[3]
rows = [json.loads(l) for l in open(path) if l.strip()]
alias = {"kerple": "kerple_log", "dape-kerple": "dape_kerple_log", "dape-alibi": "dape_alibi",
         "dape-fire": "dape_fire"}
peers = [("pytorch-eager", "eager"), ("pytorch-sdpa-eager", "SDPA"), ("pytorch-compile", "compiled")]
def key(r):
    return (alias.get(r["encoding"], r["encoding"]), r["mode"], r["length"], r["batch"])
def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
# Repeated measurements (REPEATS) of one implementation and key: the median tokens/s and peak
# RSS, with the range of tokens/s when there is more than one.
groups = {}
for r in rows:
    if "failed" not in r:
        groups.setdefault((r["impl"],) + key(r), []).append(r)
def summary(rs):
    out = dict(rs[0])
    speeds = [x["tokens_per_second"] for x in rs]
    out["tokens_per_second"] = median(speeds)
    out["range"] = (min(speeds), max(speeds)) if len(rs) > 1 else None
    rss = [x["peak_rss_mib"] for x in rs if x.get("peak_rss_mib")]
    out["peak_rss_mib"] = median(rss) if rss else None
    return out
ours, seen = [], set()
for r in rows:
    if r.get("impl") == "dape" and "failed" not in r and key(r) not in seen:
        seen.add(key(r))
        ours.append(summary(groups[("dape",) + key(r)]))
done = {k: summary(v) for k, v in groups.items() if k[0] != "dape"}
repeats = max((len(v) for v in groups.values()), default=1)
present = [(impl, name) for impl, name in peers if any(k[0] == impl for k in done)]
torch = next((r.get("torch") for r in rows if r.get("torch")), "2.9")
print(f"Machine: {platform.processor() or platform.machine()}, {threads} threads; dape on {backend}; "
      f"PyTorch {torch} on the CPU ({', '.join(n for _, n in present)}); the model of torch_ref.py "
      "(4 layers, d_model 256, 8 heads, vocab 256). Ratios are ours / the peer's tokens per second "
      "(above 1: we are faster) and ours / the peer's peak RSS (below 1: we use less)."
      + (f" Each figure is the median of up to {repeats} runs taken round after round, with the "
         "range of tokens per second in brackets." if repeats > 1 else "") + "\n")
cols = " | ".join(f"{n} tok/s (ours/{n})" for _, n in present)
rss = " | ".join(f"{n} MiB" for _, n in present)
print(f"| mode | encoding | length | batch | dape tok/s | {cols} | dape peak RSS MiB | {rss} |")
print("| --- | --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in present) + " | ---: | "
      + " | ".join("---:" for _ in present) + " |")
f = lambda v, p=0: f"{v:,.{p}f}" if isinstance(v, (int, float)) else "—"
spread = lambda r: f" [{f(r['range'][0])}–{f(r['range'][1])}]" if r.get("range") else ""
for r in ours:
    if "failed" in r:
        continue
    speed, mem = [], []
    for impl, _ in present:
        t = done.get((impl,) + key(r))
        if t is None:
            speed.append("—"); mem.append("—"); continue
        speed.append(f"{f(t['tokens_per_second'])}{spread(t)} ({r['tokens_per_second'] / t['tokens_per_second']:.2f}×)")
        m = t.get("peak_rss_mib")
        mem.append(f"{f(m)} ({r['peak_rss_mib'] / m:.2f}×)" if m and r.get("peak_rss_mib") else f(m))
    print(f"| {r['mode']} | {key(r)[0]} | {r['length']} | {r['batch']} | {f(r['tokens_per_second'])}{spread(r)} | "
          + " | ".join(speed) + f" | {f(r.get('peak_rss_mib'))} | " + " | ".join(mem) + " |")
fails = [r for r in rows if "failed" in r]
if fails:
    print("\nFailed measurements (a failed allocation under the MEM_LIMIT_GB address-space limit "
          "exits with 1 from Python or 134 (abort) from Rust; 137: killed; 124: timed out):\n")
    for r in fails:
        print(f"- {r['impl']}: exit {r['failed']}: `{r['args']}`")
PY
cat "$OUT/table.md"
