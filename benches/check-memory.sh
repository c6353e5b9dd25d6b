#!/usr/bin/env bash
# `vinetl check` on 1 M and 10 M rows, side by side in one run: wall time and
# peak RSS. Memory must stay flat (bounded), not grow with the row count.
#   bash benches/check-memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/vinetl-target}"
cargo build --release --locked -q
bin="$CARGO_TARGET_DIR/release/vinetl"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 1 M VINs from the pattern fixtures with random serials and fixed check
# digits; the 10 M file is ten copies (so also 9 M duplicates to count).
python3 benches/gen-vins.py 1000000 "$work/vins-1m.txt" 0 --random
for _ in $(seq 10); do cat "$work/vins-1m.txt"; done > "$work/vins-10m.txt"
gzip -1 -k "$work/vins-10m.txt"

for f in vins-1m.txt vins-10m.txt vins-10m.txt.gz; do
  /usr/bin/time -f "$f: wall %e s, peak RSS %M KB" "$bin" check "$work/$f" --json > "$work/out.json"
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"  rows {r['rows']:,}, valid {r['valid']:,}, duplicates {r['duplicates']:,}\")" "$work/out.json"
done
