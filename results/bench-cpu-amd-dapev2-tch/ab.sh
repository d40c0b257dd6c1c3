#!/usr/bin/env bash
# A/B on LibTorch CPU: DAPE V2-Kerple through the tensor path (base: the release binary of 04bbb40)
# against its LibTorch node (new), and Kerple alone; both built
# with --features tch. Needs LD_LIBRARY_PATH from scripts/setup-libtorch.sh.
set -u
out=${OUT:-ab.jsonl}
for rep in 1 2 3; do
  for shape in "128 8" "512 4"; do
    for pair in "base dapev2_kerple_log" "new dapev2_kerple_log" "new kerple_log"; do
      set -- $shape $pair
      bin=${BASE_BIN:?release binary of 04bbb40}; [ "$3" = new ] && bin=${NEW_BIN:?release binary of this commit}
      line=$("$bin" bench --backend tch-cpu --mode train --encoding "$4" --length "$1" --batch "$2" --steps 8 2>/dev/null | tail -n 1)
      echo "{\"bin\": \"$3\", \"rep\": $rep, \"result\": $line}" >> "$out"
    done
  done
done
