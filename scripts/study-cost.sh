#!/usr/bin/env bash
# The study's training cost (seconds per 1,000 training tokens) regenerated with the current
# binary, without training the study's models again: each LM config of the study's books grid
# trains for STEPS optimiser steps (the full runs take 2000) and its train.json gives wall and
# CPU seconds. The table sets them beside the study's own figures (results/study/lm-books, the
# commit that trained those runs), so a change to a kernel shows in the study's units.
#
#   scripts/study-cost.sh                              # the DAPE rows and their bases
#   ENCODINGS="kerple_log dape_kerple_log" STEPS=100 scripts/study-cost.sh
#
# Environment: ENCODINGS (configs/lm/<name>.json; default the study's DAPE rows and their
# bases), STEPS (default 300), DATA (default data/books, fetched if missing), OUT (runs, default
# runs/study-cost), RESULTS (default results/study/train-cost: results.jsonl and table.md),
# BACKEND (default ndarray), DAPE_BIN (a built binary; default a release build).
# Each run starts afresh (its folder is replaced). Measure on a quiet machine: the wall seconds
# grow with anything else running; the CPU seconds much less so.
set -euo pipefail
cd "$(dirname "$0")/.."

ENCODINGS=${ENCODINGS:-"alibi dape_alibi kerple_log dape_kerple_log fire dape_fire fox dape_fox dapev2_kerple_log"}
STEPS=${STEPS:-300}
DATA=${DATA:-data/books}
OUT=${OUT:-runs/study-cost}
RESULTS=${RESULTS:-results/study/train-cost}
BACKEND=${BACKEND:-ndarray}

if [ -z "${DAPE_BIN:-}" ]; then
  cargo build --release --quiet
fi
dape=${DAPE_BIN:-${CARGO_TARGET_DIR:-target}/release/dape}
[ -d "$DATA" ] || scripts/fetch-corpus.sh books "$DATA"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain -- src 2>/dev/null | head -n 1)
[ -n "$dirty" ] && commit="$commit+changes"

mkdir -p "$OUT" "$RESULTS"
lines=$RESULTS/results.jsonl
for e in $ENCODINGS; do
  config=configs/lm/$e.json
  [ -f "$config" ] || { echo "no config $config" >&2; exit 2; }
  run=$OUT/$e
  rm -rf "$run"
  echo "== $e: $STEPS steps"
  "$dape" train --config "$config" --data "$DATA" --out "$run" --backend "$BACKEND" \
    --steps "$STEPS" --lines 50
  python3 - "$run/train.json" "$e" "$commit" "$STEPS" >> "$lines" <<'EOF'
import json, sys, platform
path, name, commit, steps = sys.argv[1:]
t = json.load(open(path))
tokens = t["steps"] * t["tokens_per_step"] / 1000
print(json.dumps({
    "encoding": name, "commit": commit, "steps": int(steps), "backend": t["backend"],
    "machine": platform.processor() or platform.machine(),
    "wall_s_per_1k_tokens": t["seconds"] / tokens,
    "cpu_s_per_1k_tokens": t["cpu_seconds"] / tokens,
}))
EOF
done

# The table: the latest line of each encoding beside the study's runs (mean over their seeds).
python3 - "$lines" "$RESULTS/table.md" <<'EOF'
import glob, json, os, sys
lines, out = sys.argv[1:]
latest = {}
for line in open(lines):
    r = json.loads(line)
    latest[r["encoding"]] = r
def study(name):
    runs = [p for p in glob.glob("results/study/lm-books/*/train.json")
            if os.path.basename(os.path.dirname(p)).split("-seed")[0] == name]
    if not runs:
        return None
    vals = []
    for p in runs:
        t = json.load(open(p))
        k = t["steps"] * t["tokens_per_step"] / 1000
        vals.append((t["seconds"] / k, t["cpu_seconds"] / k))
    return [sum(v[i] for v in vals) / len(vals) for i in (0, 1)]
rows = ["| encoding | commit | steps | wall s | CPU s | the study's wall s | the study's CPU s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
for name, r in latest.items():
    s = study(name)
    st = ("%.3f" % s[0], "%.3f" % s[1]) if s else ("—", "—")
    rows.append("| %s | %s | %d | %.3f | %.3f | %s | %s |" % (
        name, r["commit"], r["steps"], r["wall_s_per_1k_tokens"], r["cpu_s_per_1k_tokens"], *st))
text = ("Training cost per 1,000 training tokens on the study's books configs (validation rounds "
        "included), from `scripts/study-cost.sh`: the latest run of each encoding at the commit named, "
        "beside the mean of the study's own runs (`results/study/lm-books`, 2000 steps each). CPU "
        "seconds count every thread.\n\n" + "\n".join(rows) + "\n")
tmp = out + ".tmp"
open(tmp, "w").write(text)
os.replace(tmp, out)
print(text)
EOF
