#!/usr/bin/env bash
# Output writing, measured in one run: for each row count (default 1,000,000
# and 10,000,000), a finished job of that many rows is synthesised straight
# into the state tables (100,000 distinct decoded VINs with full API JSON,
# three carried columns), then `vinetl write JOB` writes it:
#   1. as a local Parquet dataset;
#   2. to Postgres tables (results + vehicles), in the same database.
# Prints rows/s and peak RSS of each, and the 10 M / 1 M ratios.
# OUTPUTS=parquet skips the Postgres tables; EXPLAIN=1 prints the plan of the
# state query's core join.
#   bash benches/outputs.sh [ROWS ...]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/vinetl-target}"
cargo build --release --locked -q
bin="$CARGO_TARGET_DIR/release/vinetl"
work=$(mktemp -d)
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
schema="bench_outputs_$$"
export VINETL_SCHEMA="$schema"
cleanup() {
  psql "$DATABASE_URL" -qc "DROP SCHEMA IF EXISTS $schema CASCADE" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
sizes=("$@")
[ ${#sizes[@]} -eq 0 ] && sizes=(1000000 10000000)

"$bin" migrate > /dev/null
python3 benches/gen-vins.py 100000 "$work/vins.txt"
"$bin" decode 1HGCM82633A004352 | python3 -c 'import json,sys; d=json.load(sys.stdin); d=d[0] if isinstance(d,list) else d; print(json.dumps(d))' > "$work/template.json"
psql "$DATABASE_URL" -q -v ON_ERROR_STOP=1 <<SQL
SET search_path = $schema, public;
CREATE TEMP TABLE v (vin text);
\copy v FROM '$work/vins.txt'
CREATE TEMP TABLE tpl (raw jsonb);
\copy tpl FROM '$work/template.json'
INSERT INTO vin_cache (vin, make, model, model_year, raw)
SELECT v.vin, 'HONDA', 'ACCORD', 2003, tpl.raw || jsonb_build_object('VIN', v.vin) FROM v, tpl;
CREATE TABLE bench_vins AS SELECT row_number() OVER () - 1 AS i, vin FROM v;
SQL

result() { # LABEL ROWS
  read -r wall rss user sys < "$work/time"
  printf '%-9s %9s rows: %6.1f s, %8.0f rows/s, peak RSS %6.1f MB, vinetl CPU %.0f%%\n' "$1" "$2" "$wall" \
    "$(echo "$2 / $wall" | bc -l)" "$(echo "$rss / 1024" | bc -l)" "$(echo "100 * ($user + $sys) / $wall" | bc -l)"
  echo "$1 $2 $wall $rss" >> "$work/results"
}

for rows in "${sizes[@]}"; do
  out="$work/out-$rows"
  spec=$(printf '{"name":"bench","source":{"kind":"file","path":"bench.csv","format":"auto","vin_column":null,"carry":["unit_id","depot","odometer_km"]},"provider":{"base_url":"http://127.0.0.1:9","api_key_env":"CARVIN_API_KEY","requests_per_second":100},"cache":{"ttl_hours":720},"recalls":{"enabled":false,"ttl_hours":null,"per_vin":false},"outputs":[{"kind":"parquet","path":"%s","partition":null,"endpoint":null,"region":null,"rows_per_file":null}]}' "$out")
  job=$(psql "$DATABASE_URL" -qtA -v ON_ERROR_STOP=1 <<SQL
SET search_path = $schema, public;
WITH j AS (INSERT INTO jobs (name, spec, spec_hash, batches_planned, state, finished_at)
           VALUES ('bench', '$spec', 'bench-$rows', true, 'done', now()) RETURNING job_id),
     i AS (INSERT INTO job_inputs (job_id, source, row_number, raw_vin, vin, check_digit_valid, carried, plan, status, decoded_at)
           SELECT j.job_id, 'bench.csv', g, b.vin, b.vin, true,
                  jsonb_build_object('unit_id', 'U' || g, 'depot', (ARRAY['Leeds','Austin','Dayton','Tacoma'])[1 + g % 4],
                                     'odometer_km', g % 300000),
                  'call', 'decoded', now()
           FROM j, generate_series(1, $rows) g JOIN bench_vins b ON b.i = g % 100000)
SELECT job_id FROM j;
SQL
)
  psql "$DATABASE_URL" -qc "ANALYZE $schema.job_inputs" >/dev/null
  if [ -n "${EXPLAIN:-}" ]; then
    psql "$DATABASE_URL" -c "SET search_path = $schema, public; EXPLAIN (ANALYZE, BUFFERS) SELECT ji.source, ji.row_number, c.raw->>'Make' FROM job_inputs ji LEFT JOIN vin_cache c ON c.vin = ji.vin WHERE ji.job_id = $job ORDER BY ji.source, ji.row_number"
  fi
  /usr/bin/time -f "%e %M %U %S" -o "$work/time" "$bin" write "$job" > /dev/null
  result parquet "$rows"
  du -sh "$out" | awk '{print "          dataset on disk: " $1}'
  if [ "${OUTPUTS:-all}" != parquet ]; then
    psql "$DATABASE_URL" -qc "UPDATE $schema.jobs SET spec = jsonb_set(spec, '{outputs}', '[{\"kind\":\"postgres\",\"url_env\":null,\"schema\":\"$schema\",\"results_table\":\"results\",\"vehicles_table\":\"vehicles\"}]') WHERE job_id = $job" >/dev/null
    /usr/bin/time -f "%e %M %U %S" -o "$work/time" "$bin" write "$job" > /dev/null
    result postgres "$rows"
    psql "$DATABASE_URL" -qc "DELETE FROM $schema.results WHERE job_id = $job" >/dev/null
  fi
  rm -rf "$out"
  psql "$DATABASE_URL" -qc "DELETE FROM $schema.job_inputs WHERE job_id = $job" >/dev/null
done

if [ ${#sizes[@]} -ge 2 ]; then
  python3 - "$work/results" <<'PY'
import sys
r = [l.split() for l in open(sys.argv[1])]
for kind in ("parquet", "postgres"):
    rs = [x for x in r if x[0] == kind]
    if len(rs) < 2:
        continue
    a, b = rs[0], rs[-1]
    speed = lambda x: int(x[1]) / float(x[2])
    print(f"{kind}: {b[1]} / {a[1]} rows: rows/s ratio {speed(b) / speed(a):.2f}, peak RSS ratio {int(b[3]) / int(a[3]):.2f}")
PY
fi
