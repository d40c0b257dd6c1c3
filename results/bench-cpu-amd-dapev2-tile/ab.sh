#!/usr/bin/env bash
# A/B: DAPE V2-Kerple through the separate node (base) vs inside the tile (new), and Kerple, ndarray.
set -u
out=${OUT:-/work/v2ab.jsonl}
for rep in 1 2 3; do
  for shape in "128 8" "512 4"; do
    set -- $shape
    for pair in "base dapev2_kerple_log" "new dapev2_kerple_log" "new kerple_log"; do
      set -- $shape $pair
      bin=/work/bin-$3; [ "$3" = new ] && bin=/work/bin-v2tile
      line=$(/usr/bin/time -f "%M" -o /tmp/rss.txt "$bin" bench --mode train --encoding "$4" --length "$1" --batch "$2" --steps 8 2>/dev/null | tail -n 1)
      echo "{\"bin\": \"$3\", \"rep\": $rep, \"result\": $line}" >> "$out"
      echo "$3 $4 $1x$2: $(echo "$line" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["tokens_per_second"]), d.get("peak_rss_mib"), d.get("attention_path"))')"
    done
  done
done
