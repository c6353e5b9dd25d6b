#!/usr/bin/env bash
# Runner throughput, measured in one run on this machine:
#   1. planning: `vinetl submit` of N distinct VINs (default 1,000,000; pass
#      10000000 for the 10 M figure) into the local Postgres: rows/s and peak RSS;
#   2. end to end: `vinetl run` of 100,000 distinct VINs against a release
#      `vinetl serve` with no limits: VINs/s.
#   bash benches/runner.sh [ROWS]
set -euo pipefail
cd "$(dirname "$0")/.."
rows="${1:-1000000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/vinetl-target}"
cargo build --release --locked -q
bin="$CARGO_TARGET_DIR/release/vinetl"
work=$(mktemp -d)
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
schema="bench_runner_$$"
cleanup() {
  [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null
  psql "$DATABASE_URL" -qc "DROP SCHEMA IF EXISTS $schema CASCADE; DELETE FROM apalis.jobs WHERE job_type = 'vinetl.batches.$schema'" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT
export VINETL_SCHEMA="$schema"

gen() { python3 benches/gen-vins.py "$1" "$2"; }  # N FILE: N distinct VINs

spec() { # FILE BASE_URL
cat > "$work/job.toml" <<TOML
name = "bench"
[source]
kind = "file"
path = "$1"
[provider]
base_url = "$2"
api_key_env = "CARVIN_API_KEY"
requests_per_second = 100000
TOML
}

# 1. Planning.
gen "$rows" "$work/plan.txt"
spec "$work/plan.txt" "http://127.0.0.1:9"
/usr/bin/time -f "%e %M" -o "$work/time" "$bin" submit "$work/job.toml" > /dev/null
read -r wall rss < "$work/time"
printf 'planning %s rows: %.1f s, %.0f rows/s, peak RSS %.1f MB\n' "$rows" "$wall" "$(echo "$rows / $wall" | bc -l)" "$(echo "$rss / 1024" | bc -l)"
psql "$DATABASE_URL" -qc "DROP SCHEMA $schema CASCADE; DELETE FROM apalis.jobs WHERE job_type = 'vinetl.batches.$schema'" >/dev/null

# 2. End to end against an unlimited server.
printf '[[keys]]\nkey = "bench-key-unlimited"\ntier = "pro"\n' > "$work/keys.toml"
"$bin" serve --bind 127.0.0.1:0 --keys "$work/keys.toml" 2> "$work/serve.log" &
pid=$!
for _ in $(seq 50); do grep -q listening "$work/serve.log" && break; sleep 0.1; done
url=$(grep -o 'http://[0-9.:]*' "$work/serve.log" | head -1)
gen 100000 "$work/e2e.txt"
spec "$work/e2e.txt" "$url"
start=$(date +%s.%N)
CARVIN_API_KEY=bench-key-unlimited "$bin" run "$work/job.toml" --concurrency "${CONCURRENCY:-8}" > "$work/run.txt"
end=$(date +%s.%N)
grep -E "decoded|calls made" "$work/run.txt" | sed 's/^ */  /'
printf 'end to end 100000 VINs: %.1f s, %.0f VINs/s\n' "$(echo "$end - $start" | bc -l)" "$(echo "100000 / ($end - $start)" | bc -l)"
