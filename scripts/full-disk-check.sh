#!/usr/bin/env bash
# A training run on a real filesystem that fills up (issue 38): a 200 KiB tmpfs holds the run
# folder, so `dape train` meets ENOSPC part-way. The run must end with the named error and no
# panic; after the filesystem is grown ("space freed"), `--resume` must end at the final
# validation loss of an uninterrupted run of the same config.
#
#   scripts/full-disk-check.sh [path/to/dape]     (default: target/debug/dape)
#
# Mounting needs root (CI runs as root); elsewhere the script says so and skips. `cargo test`
# covers the same ground anywhere with an injected full disk (tests/full_disk.rs).
set -euo pipefail
dape=${1:-${CARGO_TARGET_DIR:-target}/debug/dape}
work=$(mktemp -d)
mnt=$work/small
cleanup() { umount "$mnt" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$mnt" "$work/data"
if ! mount -t tmpfs -o size=200k tmpfs "$mnt" 2>/dev/null; then
  echo "full-disk-check: skipped (cannot mount a tmpfs here: needs root)"
  exit 0
fi
python3 - "$work/data" <<'PY'
import random, sys
random.seed(1)
words = "the whale ship sea captain and of a to in long white sailed storm night said he".split()
for d in range(12):
    with open(f"{sys.argv[1]}/doc-{d:02}.txt", "w") as f:
        f.write(" ".join(random.choice(words) for _ in range(400)))
PY
cat > "$work/lm.json" <<JSON
{"encoding": {"type": "alibi"}, "data": "$work/data", "d_model": 16, "n_layers": 1,
 "n_heads": 2, "train_length": 16, "batch_size": 2, "steps": 400, "warmup_steps": 1,
 "checkpoint_every": 20, "valid_lengths": [16], "valid_tokens": 32,
 "split": {"seed": 3, "valid_fraction": 0.1, "test_fraction": 0.2}}
JSON
train() { "$dape" train --config "$work/lm.json" --cache "$work/cache" --lines 100 "$@"; }
last_loss() { grep '^valid' "$1" | tail -1 | awk '{print $3}'; }

train --out "$work/reference" > "$work/reference.log" 2>&1
rc=0
train --out "$mnt/run" > "$work/full.log" 2>&1 || rc=$?
if [ "$rc" = 0 ] || ! grep -q "the disk is full" "$work/full.log" || grep -q panicked "$work/full.log"; then
  echo "full-disk-check: the run on a full disk did not end with the named error (exit $rc):" >&2
  tail -5 "$work/full.log" >&2
  exit 1
fi
echo "full-disk-check: $(grep -m1 'the disk is full' "$work/full.log")"
mount -o remount,size=8m "$mnt"
train --out "$mnt/run" --resume > "$work/resume.log" 2>&1 || {
  echo "full-disk-check: --resume failed after space was freed:" >&2
  tail -5 "$work/resume.log" >&2
  exit 1
}
want=$(last_loss "$work/reference.log") got=$(last_loss "$work/resume.log")
echo "full-disk-check: $(grep -m1 '^resuming' "$work/resume.log" || echo 'resumed from step 0');" \
  "final validation loss $got, uninterrupted $want"
python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); sys.exit(abs(a - b) > 0.01 * b)" \
  "$got" "$want" || { echo "full-disk-check: the resumed run ends elsewhere" >&2; exit 1; }
echo "full-disk-check: ok"
