#!/usr/bin/env bash
# API calls per 1,000 VINs for a realistic nightly fleet, against the naive
# client (one decode call per 20 rows plus one recall call per row).
#
# Yesterday's fleet: N (default 10,000) vehicles of a few hundred models
# (300 vPIC patterns, random serials), run once to warm the caches. Tonight's
# file: 90% of its VINs unchanged since yesterday, the rest new; 5% of rows
# are duplicates and 2% invalid. Tonight is run twice, each time in a schema
# warmed by yesterday's run:
#   warm:    recall TTL 24 h (yesterday's lookups still fresh);
#   refresh: recall TTL 0 (every make/model/year looked up again tonight).
#   bash benches/recalls.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-10000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/vinetl-target}"
cargo build --release --locked -q
bin="$CARGO_TARGET_DIR/release/vinetl"
work=$(mktemp -d)
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
schemas=()
cleanup() {
  [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null
  for s in "${schemas[@]}"; do
    psql "$DATABASE_URL" -qc "DROP SCHEMA IF EXISTS $s CASCADE; DELETE FROM apalis.jobs WHERE job_type = 'vinetl.batches.$s'" >/dev/null 2>&1
  done
  rm -rf "$work"
}
trap cleanup EXIT

python3 - "$n" "$work" <<'PY'
import random, sys
n, work = int(sys.argv[1]), sys.argv[2]
W = [8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2]
T = {**{str(i): i for i in range(10)},
     **dict(zip("ABCDEFGHJKLMNPRSTUVWXYZ", [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 7, 9, 2, 3, 4, 5, 6, 7, 8, 9]))}
def check(v):
    s = sum(T[c] * w for c, w in zip(v, W)) % 11
    return v[:8] + ("X" if s == 10 else str(s)) + v[9:]
rng = random.Random(7)
patterns = [l.strip()[:11] for l in open("tests/fixtures/pattern-vins.txt") if l.strip()][:300]
def vin():
    return check(rng.choice(patterns) + f"{rng.randrange(10**6):06d}")
yesterday = list(dict.fromkeys(vin() for _ in range(n)))
rows = n
invalid, dups = rows * 2 // 100, rows * 5 // 100
distinct = rows - invalid - dups
kept = rng.sample(yesterday, distinct * 90 // 100)
new = set(yesterday)
fresh = []
while len(fresh) < distinct - len(kept):
    v = vin()
    if v not in new:
        new.add(v); fresh.append(v)
tonight = kept + fresh
tonight += rng.sample(tonight, dups)
tonight += ["BAD" + str(i) for i in range(invalid)]
rng.shuffle(tonight)
open(f"{work}/yesterday.txt", "w").write("\n".join(yesterday) + "\n")
open(f"{work}/tonight.txt", "w").write("\n".join(tonight) + "\n")
PY

printf '[[keys]]\nkey = "bench-key-unlimited"\ntier = "pro"\n' > "$work/keys.toml"
"$bin" serve --bind 127.0.0.1:0 --keys "$work/keys.toml" 2> "$work/serve.log" &
pid=$!
for _ in $(seq 50); do grep -q listening "$work/serve.log" && break; sleep 0.1; done
url=$(grep -o 'http://[0-9.:]*' "$work/serve.log" | head -1)
export CARVIN_API_KEY=bench-key-unlimited

spec() { # FILE RECALL_TTL
cat > "$work/job.toml" <<TOML
name = "nightly"
[source]
kind = "file"
path = "$1"
[provider]
base_url = "$url"
api_key_env = "CARVIN_API_KEY"
requests_per_second = 100000
[recalls]
enabled = true
ttl_hours = $2
TOML
}

calls() { # SCHEMA JOB -> "decode recall rows"
  VINETL_SCHEMA="$1" "$bin" status "$2" --json | python3 -c 'import json,sys; s=json.load(sys.stdin); r=s["recalls"]["calls"]; print(s["calls_made"] - r, r, s["rows"])'
}

for mode in warm refresh; do
  schema="bench_recalls_${mode}_$$"
  schemas+=("$schema")
  export VINETL_SCHEMA="$schema"
  spec "$work/yesterday.txt" 24
  "$bin" run "$work/job.toml" --concurrency 8 > /dev/null
  ttl=24; [ "$mode" = refresh ] && ttl=0
  spec "$work/tonight.txt" "$ttl"
  "$bin" run "$work/job.toml" --concurrency 8 > "$work/tonight-$mode.txt"
  read -r decode recall rows < <(calls "$schema" 2)
  python3 - "$mode" "$decode" "$recall" "$rows" <<'PY'
import sys
mode, decode, recall, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
naive = -(-rows // 20) + rows
per = lambda c: 1000 * c / rows
print(f"{mode:8} {rows} rows: {decode} decode + {recall} recall calls = {per(decode + recall):6.1f} per 1,000 VINs;"
      f" naive {naive} = {per(naive):6.1f} per 1,000 VINs; {naive / max(decode + recall, 1):5.1f}x fewer")
PY
done
