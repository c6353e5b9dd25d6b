#!/usr/bin/env bash
# The two state stores side by side, in one run: the same job (N distinct
# VINs, default 20,000; recall lookups on) worked end to end by `vinetl run`
# against a release `vinetl serve` with no limits, once on Postgres and once
# on SQLite. Prints wall time, VINs/s, calls and peak RSS for each.
#   bash benches/stores.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-20000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/vinetl-target}"
cargo build --release --locked -q
bin="$CARGO_TARGET_DIR/release/vinetl"
work=$(mktemp -d)
pg="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
schema="bench_stores_$$"
cleanup() {
  [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null
  psql "$pg" -qc "DROP SCHEMA IF EXISTS $schema CASCADE; DELETE FROM apalis.jobs WHERE job_type = 'vinetl.batches.$schema'" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT

python3 benches/gen-vins.py "$n" "$work/vins.txt"
printf '[[keys]]\nkey = "bench-key-unlimited"\ntier = "pro"\n' > "$work/keys.toml"
"$bin" serve --bind 127.0.0.1:0 --keys "$work/keys.toml" 2> "$work/serve.log" &
pid=$!
for _ in $(seq 50); do grep -q listening "$work/serve.log" && break; sleep 0.1; done
url=$(grep -o 'http://[0-9.:]*' "$work/serve.log" | head -1)
cat > "$work/job.toml" <<TOML
name = "bench"
[source]
kind = "file"
path = "vins.txt"
[provider]
base_url = "$url"
api_key_env = "CARVIN_API_KEY"
requests_per_second = 100000
[recalls]
enabled = true
TOML
export CARVIN_API_KEY=bench-key-unlimited VINETL_SCHEMA="$schema"
for store in postgres sqlite; do
  url_for=$pg; [ "$store" = sqlite ] && url_for="sqlite://$work/state.db"
  DATABASE_URL="$url_for" /usr/bin/time -f "%e %M" -o "$work/time" \
    "$bin" run "$work/job.toml" --concurrency "${CONCURRENCY:-8}" > "$work/run-$store.txt"
  read -r wall rss < "$work/time"
  calls=$(awk '/calls made/ {print $3}' "$work/run-$store.txt")
  printf '%-8s %s VINs: %6.1f s, %6.0f VINs/s, %s calls, peak RSS %5.1f MB\n' "$store" "$n" "$wall" \
    "$(echo "$n / $wall" | bc -l)" "$calls" "$(echo "$rss / 1024" | bc -l)"
done
