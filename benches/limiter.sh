#!/usr/bin/env bash
# The shared limiter at R = 20 requests/s against `vinetl serve` (a key
# limited to 20/s), side by side in one run: 1, 2 and 4 `vinetl worker`
# processes (4 calls in flight each), then the integration guide's own
# `decodeAll` loop (sequential 20-VIN chunks, 200 ms pause) on the same VINs.
#   bash benches/limiter.sh [VINS]      (default 4000 VINs = 200 calls a run)
set -euo pipefail
cd "$(dirname "$0")/.."
vins="${1:-4000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/vinetl-target}"
cargo build --release --locked -q
bin="$CARGO_TARGET_DIR/release/vinetl"
work=$(mktemp -d)
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for s in $(psql "$DATABASE_URL" -tAc "select nspname from pg_namespace where nspname like 'bench_lim_$$%'"); do
    psql "$DATABASE_URL" -qc "DROP SCHEMA $s CASCADE; DELETE FROM apalis.jobs WHERE job_type = 'vinetl.batches.$s'" >/dev/null 2>&1
  done
  rm -rf "$work"
}
trap cleanup EXIT

printf '[[keys]]\nkey = "bench-20-per-second"\ntier = "pro"\nper_day = 1000000\nper_second = 20\n' > "$work/keys.toml"
"$bin" serve --bind 127.0.0.1:0 --keys "$work/keys.toml" 2> "$work/serve.log" &
pids+=($!)
for _ in $(seq 50); do grep -q listening "$work/serve.log" && break; sleep 0.1; done
url=$(grep -o 'http://[0-9.:]*' "$work/serve.log" | head -1)

python3 benches/gen-vins.py "$vins" "$work/vins.txt" 500000
cat > "$work/job.toml" <<TOML
name = "limiter-bench"
[source]
kind = "file"
path = "vins.txt"
[provider]
base_url = "$url"
api_key_env = "CARVIN_API_KEY"
requests_per_second = 20
burst = 2                      # a little slack absorbs timer and network jitter
TOML
export CARVIN_API_KEY=bench-20-per-second

# Achieved rate = (calls - 1) / (last call - first call), from the times the
# calls' results were stored (database clock): worker start-up is not counted.
printf '%-28s %8s %8s %10s %8s\n' "client" "calls" "429s" "req/s" "share of R"
for n in 1 2 4; do
  export VINETL_SCHEMA="bench_lim_$$_$n"
  "$bin" submit "$work/job.toml" > /dev/null
  # The VINs are new to every schema (each has its own cache).
  wpids=()
  for _ in $(seq "$n"); do "$bin" worker --concurrency 4 2>/dev/null & wpids+=($!); pids+=($!); done
  until "$bin" status 1 --json | grep -q '"state": "done"'; do sleep 0.05; done
  kill -TERM "${wpids[@]}"; wait "${wpids[@]}" 2>/dev/null || true
  read -r calls limited < <("$bin" status 1 --json | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["calls_made"], s["rate_limited"])')
  span=$(psql "$DATABASE_URL" -tAc "SELECT extract(epoch FROM max(decoded_at) - min(decoded_at)) FROM $VINETL_SCHEMA.vin_cache")
  rps=$(echo "($calls - 1) / $span" | bc -l)
  printf '%-28s %8d %8d %10.2f %7.1f%%\n' "vinetl, $n worker(s)" "$calls" "$limited" "$rps" "$(echo "$rps / 20 * 100" | bc -l)"
done

# The guide's decodeAll, verbatim but for the host and key, on the same VINs.
cat > "$work/decode_all.mjs" <<JS
async function batchDecode(vins) {
  const response = await fetch('$url/api/v1/batch-decode', {
    method: 'POST',
    headers: { 'Authorization': 'Bearer bench-20-per-second', 'Content-Type': 'application/json' },
    body: JSON.stringify({ vins }),
  });
  if (!response.ok) { throw new Error(\`API error: \${response.status}\`); }
  return response.json();
}
function chunkArray(array, size) {
  const chunks = [];
  for (let i = 0; i < array.length; i += size) { chunks.push(array.slice(i, i + size)); }
  return chunks;
}
const answered = [];
async function decodeAll(vins) {
  const chunks = chunkArray(vins, 20);
  const results = [];
  for (const chunk of chunks) {
    const response = await batchDecode(chunk);
    answered.push(performance.now()); // measurement only
    results.push(...response.data);
    await new Promise(resolve => setTimeout(resolve, 200));
  }
  return results;
}
const vins = (await import('node:fs')).readFileSync('$work/vins.txt', 'utf8').trim().split('\n');
const results = await decodeAll(vins);
const secs = (answered[answered.length - 1] - answered[0]) / 1000;
console.log(JSON.stringify({ calls: answered.length, decoded: results.length, secs }));
JS
read -r calls secs < <(node "$work/decode_all.mjs" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["calls"], s["secs"])')
rps=$(echo "($calls - 1) / $secs" | bc -l)
printf '%-28s %8d %8d %10.2f %7.1f%%\n' "guide decodeAll (baseline)" "$calls" 0 "$rps" "$(echo "$rps / 20 * 100" | bc -l)"
