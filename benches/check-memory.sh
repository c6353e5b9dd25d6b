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
python3 - "$work" <<'PY'
import random, sys
random.seed(1)
pat = open('tests/fixtures/pattern-vins.txt').read().split()
W = [8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2]
T = {**{str(i): i for i in range(10)}, **dict(zip("ABCDEFGHJKLMNPRSTUVWXYZ", [1,2,3,4,5,6,7,8,1,2,3,4,5,7,9,2,3,4,5,6,7,8,9]))}
def fix(v):
    s = sum(T[c] * w for c, w in zip(v, W)) % 11
    return v[:8] + ('X' if s == 10 else str(s)) + v[9:]
with open(sys.argv[1] + '/vins-1m.txt', 'w') as f:
    for _ in range(1_000_000):
        f.write(fix(random.choice(pat)[:11] + '%06d' % random.randrange(1_000_000)) + '\n')
PY
for _ in $(seq 10); do cat "$work/vins-1m.txt"; done > "$work/vins-10m.txt"
gzip -1 -k "$work/vins-10m.txt"

for f in vins-1m.txt vins-10m.txt vins-10m.txt.gz; do
  /usr/bin/time -f "$f: wall %e s, peak RSS %M KB" "$bin" check "$work/$f" --json > "$work/out.json"
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"  rows {r['rows']:,}, valid {r['valid']:,}, duplicates {r['duplicates']:,}\")" "$work/out.json"
done
