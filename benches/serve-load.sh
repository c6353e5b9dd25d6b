#!/usr/bin/env bash
# Requests per second of `vinetl serve` on loopback, measured with wrk:
# single decode and 20-VIN batch decode, side by side in one run against the
# same server (release build, one pro key without limits).
#   bash benches/serve-load.sh [SECONDS]     (needs wrk: apt-get install wrk)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/vinetl-target}"
cargo build --release --locked -q
work=$(mktemp -d)
cat > "$work/keys.toml" <<'TOML'
[[keys]]
key = "bench-key-unlimited"
tier = "pro"
TOML
"$CARGO_TARGET_DIR/release/vinetl" serve --bind 127.0.0.1:0 --keys "$work/keys.toml" 2> "$work/serve.log" &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 50); do grep -q listening "$work/serve.log" && break; sleep 0.1; done
url=$(grep -o 'http://[0-9.:]*' "$work/serve.log" | head -1)

# Bodies: one VIN, and the first 20 pattern VINs (every VIN decodes).
vins=$(head -20 tests/fixtures/pattern-vins.txt | sed 's/.*/"&"/' | paste -sd, -)
one=$(head -1 tests/fixtures/pattern-vins.txt)
lua() { printf 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.headers["Authorization"] = "Bearer bench-key-unlimited"\nwrk.body = %s\n' "$1"; }
lua "'{\"vin\": \"$one\"}'" > "$work/decode.lua"
lua "'{\"vins\": [$vins]}'" > "$work/batch.lua"

# 2 wrk threads, 16 connections: the machine has 2 cores, shared by wrk and the server.
for case in decode batch; do
  path=/api/v1/decode; per=1
  [ "$case" = batch ] && { path=/api/v1/batch-decode; per=20; }
  out=$(wrk -t2 -c16 -d"${secs}s" --latency -s "$work/$case.lua" "$url$path")
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1 == "50%" {print $2}')
  p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
  non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
  printf '%-7s %10s req/s  %10.0f VINs/s  p50 %8s  p99 %8s  non-2xx %s\n' "$case" "$rps" "$(echo "$rps * $per" | bc -l)" "$p50" "$p99" "${non2xx:-0}"
done
