#!/usr/bin/env bash
# The length-extrapolation study at a budget that can show something (issue 17), as one
# resumable grid: language models on two corpora with extra seeds, and the 15-task CHE table.
#
#   scripts/study.sh                 # run (or resume) the whole grid, phase by phase
#   PHASES=che scripts/study.sh      # one phase
#   scripts/study.sh publish         # only rebuild results/ from what has finished
#   scripts/study.sh status          # what has finished, what is pending
#
# Phases, in order (PHASES, space-separated, selects and orders them):
#   lm-books        11 encodings on books, seed 0      (scripts/lm-sweep.sh, STEPS=2000)
#   che             15 tasks x 8 encodings             (dape che suite --resume, one cell a call)
#   lm-latex        the same 11 encodings on latex, seed 0
#   lm-books-seed1  Kerple, DAPE-Kerple, ALiBi, RoPE on books, seed 1
#   lm-books-seed2  the same, seed 2
#   lm-slow         DAPE-FoX and DAPE V2-Kerple on books, then on latex (they came last when they
#                   trained through the tensor path, 10-20x slower; since their fused ndarray
#                   nodes they cost about 1.3x and 1.7x their bases' step)
#   retrieval       MQAR, then passkey, for the 13 encodings of the LM study, PaTH, PaTH-FoX,
#                   stick-breaking over NoPE and iRoPE (rows from their LM configs; seed 0),
#                   then seeds 1 and 2 of Kerple, DAPE-Kerple, ALiBi and RoPE (issues 34 and 36;
#                   dape retrieval suite --resume, one cell a call; RETRIEVAL_TRIALS items per
#                   cell)
#   longppl         LongPPL of the books models: the fixed evaluator (configs/lm/
#                   longppl_evaluator.json, DAPE-Kerple trained at 512) finds the key tokens once
#                   per length; every published books run of the plan is trained again from its
#                   config (the weights are not committed; a run that an earlier phase trained
#                   in this $RUNS from that config is copied instead) and evaluated with dape
#                   eval --longppl (runs not published yet stay pending: the phase comes again
#                   last, after lm-new, whose runs it then copies)
#   lm-new          the methods after DAPE (issue 36): PaTH, PaTH-FoX, stick-breaking over NoPE
#                   and an iRoPE-style hybrid (configs/lm/irope.json), on books, then on latex
#   lm-new-seeds    seeds 1 and 2 on books of those four and of their nearest baselines without
#                   seeds so far (NoPE, FoX), so that each verdict comes with a spread
#
# Everything resumes: a finished LM run or CHE cell is never redone, an interrupted LM run
# continues from its last checkpoint (every CHECKPOINT_EVERY steps). Stop the grid between runs
# by creating $RUNS/STOP (removed on the next start), or at once by killing it; either way the
# next start goes on where it stopped. What is published in $RESULTS counts as finished too, so
# a fresh clone (whose $RUNS is empty: runs/ is not committed) goes on with the runs that are
# not there yet instead of redoing the committed ones; only an interrupted run's checkpoints
# live in $RUNS alone.
#
# After every finished run or cell the driver publishes into $RESULTS (default results/study):
#   lm-<corpus>/<run>/{config,train,eval}.json, eval.csv   the run's own files
#   lm-<corpus>/results.md, ppl_by_length.svg, train_cost.svg   (dape plot; unfinished runs
#                                                               are listed as pending)
#   che/suite.md, suite.json, <task>.svg                   (pending cells listed as pending)
#   retrieval/suite.md, suite.json, mqar.svg, passkey.svg   (likewise)
#   retrieval/<task>/<run>/{config,train,retrieval}.json, retrieval.csv, retrieval.svg and,
#                   for passkey, passkey_heatmap.svg
#   longppl/<run>/{config,train,eval}.json, eval.csv; longppl/results.md (perplexity and LongPPL
#                   tables, Spearman's rho between their orders), ppl_by_length.svg,
#                   evaluator.json, key-tokens/key-tokens-<length>.json
# and with COMMIT=1 commits $RESULTS alone (`git commit -- $RESULTS`), so partial results land
# as they come.
#
# Environment: RUNS (default runs/study), RESULTS (default results/study), STEPS (LM optimiser
# steps, default 2000: 4.1 M tokens of 16 x 128), CHECKPOINT_EVERY (default 200), MAX_TOKENS
# (evaluated tokens per length, default 65536: 8 windows at 8192), BACKEND
# (default ndarray), CHE_STEPS (default 1000: the README's default CHE budget), COMMIT (default
# 0), DAPE_BIN (a built dape binary; default: a release build, copied to $RUNS/bin/dape so that
# later builds do not change the binary of a running grid).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-runs/study}
RESULTS=${RESULTS:-results/study}
STEPS=${STEPS:-2000}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-200}
MAX_TOKENS=${MAX_TOKENS:-65536}
BACKEND=${BACKEND:-ndarray}
CHE_STEPS=${CHE_STEPS:-1000}
COMMIT=${COMMIT:-0}
RETRIEVAL_TRIALS=${RETRIEVAL_TRIALS:-20}
PHASES=${PHASES:-lm-books che lm-latex lm-books-seed1 lm-books-seed2 lm-slow retrieval longppl lm-new lm-new-seeds longppl}

FAST_ENCODINGS="nope rope rope_randomized t5 alibi kerple_log fire dape_alibi dape_kerple_log dape_fire fox"
SLOW_ENCODINGS="dape_fox dapev2_kerple_log"
NEW_ENCODINGS="path path_fox nope_stick_breaking irope"
LM_ENCODINGS="$FAST_ENCODINGS $SLOW_ENCODINGS $NEW_ENCODINGS"
SEED_ENCODINGS="kerple_log dape_kerple_log alibi rope"
NEW_SEED_ENCODINGS="$NEW_ENCODINGS nope fox"
CHE_ENCODINGS="nope,rope,configs/encodings/rope_randomized.json,alibi,kerple_log,fire,dape_kerple_log,dape_fire"
RETRIEVAL_ENCODINGS="nope,rope,configs/encodings/rope_randomized_8192.json,t5,alibi,kerple_log,fire,dape_alibi,dape_kerple_log,dape_fire,fox,dape_fox,dapev2_kerple_log,path,path_fox,configs/lm/nope_stick_breaking.json,configs/lm/irope.json"
RETRIEVAL_ARGS=(--tasks mqar,passkey --encodings "$RETRIEVAL_ENCODINGS" --seeds 0 --extra-seeds 1,2
  --extra-seed-encodings kerple_log,dape_kerple_log,alibi,rope --steps "$STEPS" --fraction 0.5
  --lengths 128,256,512,1024,2048,4096,8192 --trials "$RETRIEVAL_TRIALS" --backend "$BACKEND")
CHE_ARGS=(--tasks all --encodings "$CHE_ENCODINGS" --steps "$CHE_STEPS" --lengths 41..200:8
  --sequences 64 --backend "$BACKEND")

# The grid's dape processes run under `nice -n 19`, but with the kernel's autogroup scheduling
# (sched_autogroup_enabled, on in most distribution kernels) nice orders threads only within
# one session: a grid started in a session of its own (setsid, nohup from a service) still took
# half of a 2-core VM from a benchmark or CI in another session (measured, issue 39). When this
# script leads its own session, it lowers that session's group weight as well; in a shared
# terminal session it leaves the group alone (that would slow the terminal's other commands too)
# and says so.
lower_session_priority() {
  [ -w /proc/self/autogroup ] || return 0
  if [ "$(ps -o sid= -p $$ | tr -d ' ')" = "$$" ]; then
    echo 19 > /proc/self/autogroup 2>/dev/null || true
  else
    echo "study: the grid shares this terminal's scheduling group; start it with setsid to let" \
      "other sessions (benchmarks, CI) have the cores first" >&2
  fi
}


# Whether LM run $2 of corpus $1 has finished: evaluated in $RUNS, or published in $RESULTS.
lm_finished() {
  [ -f "$RUNS/lm-$1/$2/eval.json" ] || [ -f "$RESULTS/lm-$1/$2/eval.json" ]
}

# The folder that holds LM run $2 of corpus $1's finished files ($RUNS first: it is the newer).
lm_source() {
  if [ -f "$RUNS/lm-$1/$2/eval.json" ]; then echo "$RUNS/lm-$1/$2"; else echo "$RESULTS/lm-$1/$2"; fi
}

# Whether the published CHE table has every cell of the grid (none pending).
che_published_complete() {
  [ -f "$RESULTS/che/suite.json" ] && python3 - "$RESULTS/che/suite.json" <<'PY'
import json, sys
suite = json.load(open(sys.argv[1]))
sys.exit(0 if suite.get("cells") and not suite.get("pending") else 1)
PY
}

# The cell a suite's log names last ("[17/42] passkey / t5"), without its "[17/42] ".
last_cell() {
  grep -o '^\[[0-9]*/[0-9]*\] [a-z_]* / [^:]*' "$1" 2>/dev/null | tail -1 | sed 's/^\[[^]]*\] //' || true
}

# Runs publish step "${@:2}" against a copy of $RESULTS and puts the copy in place only when the
# whole step succeeded, so that a failed copy or plot (a full disk) leaves $RESULTS as it was
# before the cell ($1 names it in the message). The two renames of the swap take no space.
publish_whole() {
  local what=$1 target=$RESULTS stage=$RESULTS.publishing old=$RESULTS.replaced rc=0
  shift
  rm -rf "$stage" "$old"
  if ! { mkdir -p "$target" && cp -a "$target" "$stage"; }; then
    rm -rf "$stage"
    echo "study: cannot publish $what (is the disk full?); $target is as it was" >&2
    return 1
  fi
  RESULTS=$stage "$@" || rc=$?
  if [ "$rc" != 0 ]; then
    rm -rf "$stage"
    echo "study: publishing $what failed (is the disk full?); $target is as it was" >&2
    return 1
  fi
  mv "$target" "$old" || return 1
  if ! mv "$stage" "$target"; then
    mv "$old" "$target"
    return 1
  fi
  rm -rf "$old"
}

stop_requested() {
  if [ -f "$RUNS/STOP" ]; then
    echo "study: $RUNS/STOP found; stopping between runs (start again to resume)"
    return 0
  fi
  return 1
}

commit() {
  [ "$COMMIT" = 1 ] || return 0
  git add -- "$RESULTS"
  git diff --cached --quiet -- "$RESULTS" && return 0
  for _ in 1 2 3; do
    git commit -q -m "study: $1" -- "$RESULTS" && return 0
    sleep 5 # another git command holds the index
  done
  echo "study: could not commit ($1); the results stay in $RESULTS" >&2
}

# The runs of an LM corpus, in table order: seed 0 of every encoding, then the extra seeds.
lm_runs() {
  local e s
  for e in $LM_ENCODINGS; do echo "$e"; done
  for s in 1 2; do
    for e in $SEED_ENCODINGS $NEW_SEED_ENCODINGS; do echo "$e-seed$s"; done
  done
}

# Copies the finished runs of one corpus into $RESULTS and redraws its table and plots, with
# the unfinished runs of the plan listed as pending.
publish_lm() {
  local corpus=$1 dst=$RESULTS/lm-$corpus run src args=() pending=()
  mkdir -p "$dst"
  for run in $(lm_runs); do
    case "$corpus:$run" in latex:*-seed*) continue ;; esac
    if lm_finished "$corpus" "$run"; then
      src=$(lm_source "$corpus" "$run")
      if [ "$src" != "$dst/$run" ]; then
        mkdir -p "$dst/$run" || return 1
        for f in config.json train.json eval.json eval.csv; do
          cp "$src/$f" "$dst/$run/$f" || return 1
        done
      fi
      args+=(--run "$dst/$run")
    else
      pending+=(--pending "$run")
    fi
  done
  [ ${#args[@]} -gt 0 ] || return 0
  "$dape" plot "${args[@]}" "${pending[@]}" --out "$dst" >/dev/null
}

publish_che() {
  local f
  [ -f "$RUNS/che/suite.json" ] || return 0
  mkdir -p "$RESULTS/che" || return 1
  for f in "$RUNS"/che/suite.json "$RUNS"/che/suite.md "$RUNS"/che/*.svg; do
    [ -f "$f" ] || continue
    cp "$f" "$RESULTS/che/" || return 1
  done
}

# Copies the retrieval suite's tables and each finished cell's files into $RESULTS/retrieval.
publish_retrieval() {
  local src=$RUNS/retrieval dst=$RESULTS/retrieval f cell rel
  [ -f "$src/suite.json" ] || return 0
  mkdir -p "$dst" || return 1
  for f in "$src"/suite.json "$src"/suite.md "$src"/*.svg; do
    [ -f "$f" ] || continue
    cp "$f" "$dst/" || return 1
  done
  for cell in "$src"/*/*/; do
    [ -f "$cell/retrieval.json" ] || continue
    rel=${cell#"$src"/}
    mkdir -p "$dst/$rel" || return 1
    for f in config.json train.json retrieval.json retrieval.csv retrieval.svg passkey_heatmap.svg; do
      [ -f "$cell/$f" ] || continue
      cp "$cell/$f" "$dst/$rel/$f" || return 1
    done
  done
}

# A fresh clone has the published cells but no runs: put their files where the suite looks, so
# that it reuses them instead of training them again.
seed_retrieval_runs() {
  local cell rel
  for cell in "$RESULTS"/retrieval/*/*/; do
    [ -f "$cell/retrieval.json" ] || continue
    rel=${cell#"$RESULTS"/retrieval/}
    [ -f "$RUNS/retrieval/$rel/retrieval.json" ] && continue
    mkdir -p "$RUNS/retrieval/$rel"
    cp "$cell"/*.json "$RUNS/retrieval/$rel/"
  done
}

retrieval_phase() {
  seed_retrieval_runs
  while true; do
    stop_requested && return 1
    if ! nice -n 19 "$dape" retrieval suite "${RETRIEVAL_ARGS[@]}" --out "$RUNS/retrieval" --resume \
      --cells 1 | tee "$RUNS/retrieval-last.log"; then
      echo "study: retrieval cell $(last_cell "$RUNS/retrieval-last.log") failed; it stays pending, $RESULTS is as it was (see $RUNS/retrieval-last.log)" >&2
      return 2
    fi
    publish_whole "retrieval cell $(last_cell "$RUNS/retrieval-last.log")" publish_retrieval || return 2
    if grep -Eq '^suite: ([0-9]+) of \1 cells finished' "$RUNS/retrieval-last.log"; then
      commit "retrieval tables complete"
      return 0
    fi
    commit "retrieval cell $(last_cell "$RUNS/retrieval-last.log")"
  done
}

# Trains (or resumes) run $2 from config $1 into $2, unless its model is there.
train_once() {
  local resume=()
  [ -f "$2/model.mpk" ] && return 0
  [ -f "$2/config.json" ] && resume=(--resume)
  nice -n 19 "$dape" train --config "$1" --out "$2" --lines 100 "${resume[@]}"
}

# Copies LongPPL run $1's files from $2 (and the evaluator's config from $3) into
# $RESULTS/longppl, and redraws its table and plot from its finished runs.
publish_longppl() {
  local dst=$RESULTS/longppl run args=() pending=() f
  if [ $# -gt 0 ]; then
    mkdir -p "$dst/$1" || return 1
    cp "$3/config.json" "$dst/evaluator.json" || return 1
    for f in config.json train.json eval.json eval.csv; do
      cp "$2/$f" "$dst/$1/$f" || return 1
    done
  fi
  for run in $(lm_runs); do
    if [ -f "$dst/$run/eval.json" ]; then args+=(--run "$dst/$run"); else pending+=(--pending "$run"); fi
  done
  [ ${#args[@]} -gt 0 ] || return 0
  "$dape" plot "${args[@]}" "${pending[@]}" --out "$dst" >/dev/null
}

# Copies the trained model of books run $1 into $3 when $3 has none yet and $1 was trained
# from the published config $2 (an lm-new run trained in this $RUNS, say), so that the LongPPL
# phase evaluates it instead of training it again. The copy is made whole, then renamed.
reuse_trained() {
  local src=$1 config=$2 out=$3 f
  [ -f "$out/model.mpk" ] && return 0
  [ -f "$src/model.mpk" ] && cmp -s "$src/config.json" "$config" || return 0
  rm -rf "$out.copy" && mkdir -p "$out.copy" || return 1
  for f in model.mpk config.json train.json; do
    cp "$src/$f" "$out.copy/$f" || return 1
  done
  rm -rf "$out" && mkdir -p "$(dirname "$out")" && mv "$out.copy" "$out" || return 1
  echo "study: longppl: $src is trained from the published config; evaluating it, not training it again"
}

longppl_phase() {
  local evaluator=$RUNS/longppl-evaluator dst=$RESULTS/longppl run out
  stop_requested && return 1
  train_once configs/lm/longppl_evaluator.json "$evaluator" || {
    echo "study: the LongPPL evaluator failed; $RESULTS is as it was" >&2
    return 2
  }
  mkdir -p "$dst/key-tokens" || return 2
  for run in $(lm_runs); do
    stop_requested && return 1
    [ -f "$dst/$run/eval.json" ] && continue
    # A books run that has not finished yet (a later phase trains it) stays pending.
    [ -f "$RESULTS/lm-books/$run/config.json" ] || continue
    out=$RUNS/lm-books-longppl/$run
    if ! reuse_trained "$RUNS/lm-books/$run" "$RESULTS/lm-books/$run/config.json" "$out"; then
      echo "study: longppl $run: copying its trained books run failed; it stays pending" >&2
      return 2
    fi
    if ! train_once "$RESULTS/lm-books/$run/config.json" "$out"; then
      echo "study: longppl $run failed in training; it stays pending" >&2
      return 2
    fi
    # The key tokens are the evaluator's, per length: each file is written whole, once.
    if ! nice -n 19 "$dape" eval --run "$out" --longppl --evaluator "$evaluator" \
      --key-tokens "$dst/key-tokens" --max-tokens "$MAX_TOKENS"; then
      echo "study: the LongPPL evaluation of $run failed; it stays pending" >&2
      return 2
    fi
    publish_whole "longppl $run" publish_longppl "$run" "$out" "$evaluator" || return 2
    commit "longppl $run"
  done
}

lm_phase() { # corpus seed encodings...
  local corpus=$1 seed=$2 e name
  shift 2
  for e in "$@"; do
    stop_requested && return 1
    name=$e
    [ "$seed" != 0 ] && name=$e-seed$seed
    lm_finished "$corpus" "$name" && continue
    # (set -e does not reach inside a function called from `||`: failures are checked here.)
    if ! CORPUS=$corpus SEED=$seed ENCODINGS=$e STEPS=$STEPS CHECKPOINT_EVERY=$CHECKPOINT_EVERY \
      MAX_TOKENS=$MAX_TOKENS OUT=$RUNS/lm-$corpus BACKEND=$BACKEND DAPE_BIN=$dape PLOT=0 \
      scripts/lm-sweep.sh; then
      echo "study: lm-$corpus/$name failed; it stays pending, $RESULTS is as it was (the log above says why)" >&2
      return 2
    fi
    publish_whole "lm-$corpus/$name" publish_lm "$corpus" || return 2
    commit "lm-$corpus/$name finished"
  done
}

che_phase() {
  # A complete published table is the phase's result (a fresh clone has no cells in $RUNS).
  if [ ! -d "$RUNS/che" ] && che_published_complete; then
    echo "study: the CHE table in $RESULTS/che is complete"
    return 0
  fi
  # One new cell per call, so that every finished cell is published (and committed) at once.
  while true; do
    stop_requested && return 1
    if ! "$dape" che suite "${CHE_ARGS[@]}" --out "$RUNS/che" --resume --cells 1 \
      | tee "$RUNS/che-last.log"; then
      echo "study: CHE cell $(last_cell "$RUNS/che-last.log") failed; it stays pending, $RESULTS is as it was (see $RUNS/che-last.log)" >&2
      return 2
    fi
    publish_whole "CHE cell $(last_cell "$RUNS/che-last.log")" publish_che || return 2
    if grep -Eq '^suite: ([0-9]+) of \1 cells finished' "$RUNS/che-last.log"; then
      commit "CHE table complete"
      return 0
    fi
    commit "CHE cell $(last_cell "$RUNS/che-last.log")"
  done
}

if [ "${1:-}" = status ]; then
  for corpus in books latex; do
    done_runs=() todo=()
    for run in $(lm_runs); do
      case "$corpus:$run" in latex:*-seed*) continue ;; esac
      if lm_finished "$corpus" "$run"; then done_runs+=("$run"); else todo+=("$run"); fi
    done
    echo "lm-$corpus: ${#done_runs[@]} of $(( ${#done_runs[@]} + ${#todo[@]} )) runs finished; pending: ${todo[*]:-none}"
  done
  cells=0
  [ -d "$RUNS/che" ] && cells=$(find "$RUNS/che" -name che.json | wc -l)
  if [ "$cells" = 0 ] && che_published_complete; then
    echo "che: complete (published in $RESULTS/che)"
  else
    echo "che: $cells of 120 cells finished"
  fi
  cells=$( (find "$RUNS/retrieval" "$RESULTS/retrieval" -name retrieval.json 2>/dev/null || true) \
    | sed 's|.*/retrieval/||' | sort -u | wc -l)
  echo "retrieval: $cells of 50 cells finished (2 tasks x (17 rows + 4 x 2 extra seeds))"
  cells=$( (ls "$RESULTS"/longppl/*/eval.json 2>/dev/null || true) | wc -l)
  echo "longppl: $cells of $(lm_runs | wc -l) books runs evaluated"
  exit 0
fi

mkdir -p "$RUNS/bin"
if [ -z "${DAPE_BIN:-}" ]; then
  cargo build --release
  cp "${CARGO_TARGET_DIR:-target}/release/dape" "$RUNS/bin/dape.tmp"
  mv "$RUNS/bin/dape.tmp" "$RUNS/bin/dape"
  DAPE_BIN=$RUNS/bin/dape
fi
dape=$DAPE_BIN
rm -f "$RUNS/STOP"

if [ "${1:-}" = publish ]; then
  publish_whole "lm-books" publish_lm books
  publish_whole "lm-latex" publish_lm latex
  publish_whole "che" publish_che
  publish_whole "retrieval" publish_retrieval
  publish_whole "longppl" publish_longppl
  exit 0
fi

# A phase returns 1 when $RUNS/STOP asked the grid to stop (exit 0), 2 when a run failed.
run_phase() {
  case $1 in
    lm-books) lm_phase books 0 $FAST_ENCODINGS ;;
    lm-latex) lm_phase latex 0 $FAST_ENCODINGS ;;
    lm-slow) lm_phase books 0 $SLOW_ENCODINGS && lm_phase latex 0 $SLOW_ENCODINGS ;;
    lm-books-seed1) lm_phase books 1 $SEED_ENCODINGS ;;
    lm-books-seed2) lm_phase books 2 $SEED_ENCODINGS ;;
    lm-new) lm_phase books 0 $NEW_ENCODINGS && lm_phase latex 0 $NEW_ENCODINGS ;;
    lm-new-seeds) lm_phase books 1 $NEW_SEED_ENCODINGS && lm_phase books 2 $NEW_SEED_ENCODINGS ;;
    che) che_phase ;;
    retrieval) retrieval_phase ;;
    longppl) longppl_phase ;;
    *) echo "unknown phase '$1' (lm-books, che, lm-latex, lm-books-seed1, lm-books-seed2, lm-slow, retrieval, longppl, lm-new, lm-new-seeds)" >&2
      return 2 ;;
  esac
}

lower_session_priority
for phase in $PHASES; do
  echo "== study phase $phase ($(date -u +%H:%M:%S))"
  rc=0
  run_phase "$phase" || rc=$?
  [ "$rc" = 1 ] && exit 0
  [ "$rc" = 0 ] || exit "$rc"
done
echo "study: every phase of '$PHASES' is complete"
