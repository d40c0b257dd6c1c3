#!/usr/bin/env bash
# A/B on ndarray (release builds without LibTorch): aa01645 (base) against the tile whose
# backward rows form Z themselves (new), DAPE-Kerple, DAPE V2-Kerple and Kerple, interleaved.
set -u
out=${OUT:-ab.jsonl}
for rep in 1 2 3 4 5; do
  for shape in "128 8" "512 4"; do
    for pair in "base dape_kerple_log" "new dape_kerple_log" "base dapev2_kerple_log" "new dapev2_kerple_log" "base kerple_log" "new kerple_log"; do
      set -- $shape $pair
      bin=${BASE_BIN:?release binary of aa01645}; [ "$3" = new ] && bin=${NEW_BIN:?release binary of this commit}
      line=$("$bin" bench --mode train --encoding "$4" --length "$1" --batch "$2" --steps 8 2>/dev/null | tail -n 1)
      echo "{\"bin\": \"$3\", \"rep\": $rep, \"result\": $line}" >> "$out"
    done
  done
done
