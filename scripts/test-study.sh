#!/usr/bin/env bash
# What scripts/study.sh does when something fails, checked with a stub `dape` (no training):
#   1. a retrieval cell that fails stops the grid with exit status 2, naming the cell, and
#      leaves the results folder as it was;
#   2. a publish whose copy fails part-way (a full disk: a `cp` shim refuses one file) stops the
#      grid the same way, leaving neither a half-published results folder nor its staging copy;
#   3. with the disk back, the same cell is published whole;
#   4. the LongPPL phase evaluates a books run that this $RUNS trained from the published config
#      without training it again, and trains one whose config differs.
# Run by `cargo test` (tests/study_script.rs); needs bash and coreutils only.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin" "$work/results/retrieval"
echo "the table before the cell" > "$work/results/retrieval/suite.md"

# The stub: `dape retrieval suite ... --out DIR` finishes cell mqar / rope (or fails, with
# STUB_FAIL=1) and reports the whole suite finished, so the phase ends after one cell.
cat > "$work/bin/dape" <<'STUB'
#!/usr/bin/env bash
cmd=$1 out= run=
while [ $# -gt 0 ]; do
  case $1 in --out) out=$2 ;; --run) run=$2 ;; esac
  shift
done
case $cmd in
  # `train` and `eval` for the LongPPL phase: a trained run is its model.mpk.
  train) mkdir -p "$out"; echo "{}" > "$out/config.json"; echo "{}" > "$out/train.json"
    echo trained > "$out/model.mpk"; echo "$out" >> "$(dirname "$0")/trained.log"; exit 0 ;;
  eval) echo "{}" > "$run/eval.json"; echo "length" > "$run/eval.csv"; exit 0 ;;
  plot) exit 0 ;;
esac
echo "[3/42] mqar / rope: training"
[ "${STUB_FAIL:-0}" = 1 ] && { echo "error: the stub fails" >&2; exit 1; }
mkdir -p "$out/mqar/rope"
for f in config.json train.json retrieval.json retrieval.csv; do echo "{}" > "$out/mqar/rope/$f"; done
echo "new table" > "$out/suite.md"
echo "{}" > "$out/suite.json"
echo "suite: 42 of 42 cells finished"
STUB
# A `cp` that finds the disk full when it reaches retrieval.csv.
mkdir -p "$work/shim"
cat > "$work/shim/cp" <<'SHIM'
#!/usr/bin/env bash
for a in "$@"; do
  case $a in *retrieval.csv) echo "cp: error writing '$a': No space left on device" >&2; exit 1 ;; esac
done
exec /bin/cp "$@"
SHIM
chmod +x "$work/bin/dape" "$work/shim/cp"
snapshot=$work/snapshot
/bin/cp -a "$work/results" "$snapshot"

study() {
  RUNS=$work/runs RESULTS=$work/results DAPE_BIN=$work/bin/dape PHASES=retrieval \
    "$root/scripts/study.sh" > "$work/out.log" 2>&1
}
fail() { echo "test-study: $1" >&2; cat "$work/out.log" >&2; exit 1; }

rc=0; STUB_FAIL=1 study || rc=$?
[ "$rc" = 2 ] || fail "a failed cell: exit status $rc, not 2"
grep -q "retrieval cell mqar / rope failed" "$work/out.log" || fail "the failed cell is not named"
diff -r "$snapshot" "$work/results" > /dev/null || fail "a failed cell changed the results"

rc=0; PATH=$work/shim:$PATH study || rc=$?
[ "$rc" = 2 ] || fail "a failed publish: exit status $rc, not 2"
grep -q "publishing retrieval cell mqar / rope failed" "$work/out.log" || fail "the failed publish is not named"
diff -r "$snapshot" "$work/results" > /dev/null || fail "a failed publish changed the results"
[ ! -e "$work/results.publishing" ] || fail "the staging copy was left behind"

study || fail "the publish after the disk was freed failed"
[ -f "$work/results/retrieval/mqar/rope/retrieval.csv" ] || fail "the cell was not published"
grep -q "new table" "$work/results/retrieval/suite.md" || fail "the table was not published"

# 4. LongPPL: nope was trained in this $RUNS from its published config, rope from another one.
for run in nope rope; do
  mkdir -p "$work/results/lm-books/$run" "$work/runs/lm-books/$run"
  echo "{\"run\": \"$run\"}" > "$work/results/lm-books/$run/config.json"
  echo weights > "$work/runs/lm-books/$run/model.mpk"
  echo "{}" > "$work/runs/lm-books/$run/train.json"
done
/bin/cp "$work/results/lm-books/nope/config.json" "$work/runs/lm-books/nope/config.json"
echo '{"run": "rope", "steps": 10}' > "$work/runs/lm-books/rope/config.json"
RUNS=$work/runs RESULTS=$work/results DAPE_BIN=$work/bin/dape PHASES=longppl \
  "$root/scripts/study.sh" > "$work/out.log" 2>&1 || fail "the LongPPL phase failed"
trained=$(sed "s|^$work/runs/||" "$work/bin/trained.log" | sort | tr '\n' ' ')
[ "$trained" = "lm-books-longppl/rope longppl-evaluator " ] ||
  fail "the LongPPL phase trained '$trained', not the evaluator and rope alone"
cmp -s "$work/runs/lm-books/nope/model.mpk" "$work/runs/lm-books-longppl/nope/model.mpk" ||
  fail "nope's trained model was not the one evaluated"
for run in nope rope; do
  [ -f "$work/results/longppl/$run/eval.json" ] || fail "longppl $run was not published"
done
echo "test-study: ok"
