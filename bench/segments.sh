#!/usr/bin/env bash
# The segmentation benchmark (part of `make bench`, alone with `make bench-segments`):
#  1. real time, on the fresh database: from a Track acknowledged to `segment.entered`
#     published, at BENCH_SEG_RATE events/s (1000) for BENCH_SEG_DURATION seconds (20),
#     with one event in ten qualifying (a shop's mix) and then every event (worst case),
#     against `relance serve events segmentation`, with the event's own publication as
#     baseline;
#  2. batch evaluation of a three-condition segment over the Online Retail customers and
#     over a generated population (BENCH_SEG_CUSTOMERS, 1,000,000 customers with 20 events
#     each), three ways in the same run: the service's evaluator, the same segment compiled
#     by hand to SQL (baseline), and the full build of a version.
# Results go to target/bench/segments/*.json and the `segments` section of BENCHMARKS.md.
set -euo pipefail

cd "$(dirname "$0")/.."

CUSTOMERS=${BENCH_SEG_CUSTOMERS:-1000000}
EVENTS_PER_CUSTOMER=${BENCH_SEG_EVENTS_PER_CUSTOMER:-20}
REPS=${BENCH_SEG_REPS:-3}
RATE=${BENCH_SEG_RATE:-1000}
DURATION=${BENCH_SEG_DURATION:-20}
OUT=${BENCH_OUT:-BENCHMARKS.md}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
RESULTS=$TARGET_DIR/bench/segments
PG_SERVER=postgres://postgres@127.0.0.1:5432
DB=relance_bench_segments
GRPC_ADDR=127.0.0.1:50071
ADMIN_ADDR=127.0.0.1:9291

say() { printf '\033[1m==>\033[0m %s\n' "$*"; }

bash infra/dev.sh
say "building relance and relance-loadtest (release)"
cargo build --release -p relance -p relance-loadtest
RELANCE=$TARGET_DIR/release/relance
LOADTEST=$TARGET_DIR/release/relance-loadtest

say "creating a fresh database $DB"
PGOPTIONS='-c client_min_messages=warning' psql "$PG_SERVER/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
psql "$PG_SERVER/postgres" -qc "CREATE DATABASE $DB" >/dev/null
rm -rf "$RESULTS"
mkdir -p "$RESULTS"

export RELANCE_DATABASE_URL=$PG_SERVER/$DB
export RELANCE_GRPC_ADDR=$GRPC_ADDR
export RELANCE_ADMIN_ADDR=$ADMIN_ADDR
export RELANCE_AMQP_PREFIX=bench-seg.
export RELANCE_REDIS_PREFIX=bench-seg:
export RELANCE_LOG_LEVEL=warn
export BENCH_DATABASE_URL=$PG_SERVER/$DB
"$RELANCE" migrate >/dev/null

# Real time first, on the fresh database: the batch runs leave millions of dead rows for
# autovacuum, which would steal CPU from it.
say "real time: Track → segment.entered at $RATE events/s for $DURATION s"
"$RELANCE" serve events segmentation >>"$RESULTS/server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do
  curl -sf "http://$ADMIN_ADDR/livez" >/dev/null && break
  kill -0 "$SERVER" 2>/dev/null || { tail -20 "$RESULTS/server.log" >&2; exit 1; }
  sleep 0.25
done
RELANCE_API_KEY=$("$RELANCE" key create --workspace bench-latency --scope admin --name bench)
export RELANCE_API_KEY
export RELANCE_ADDR=http://$GRPC_ADDR
# A shop's mix (one event in ten an order that moves someone into the segment), then the
# worst case (every event does).
"$LOADTEST" segment-latency --rate "$RATE" --duration "$DURATION" --qualifying-percent 10 --seed 1 \
  --save "$RESULTS/segment-latency-1-mix.json" >/dev/null
"$LOADTEST" segment-latency --rate "$RATE" --duration "$DURATION" --qualifying-percent 100 --seed 2 \
  --save "$RESULTS/segment-latency-2-all.json" >/dev/null
kill -TERM "$SERVER"; wait "$SERVER" 2>/dev/null || true
trap - EXIT

say "batch evaluation: Online Retail customers"
"$LOADTEST" segment-batch --online-retail examples/data/online-retail.csv.gz --reps "$REPS" \
  --save "$RESULTS/segment-batch-1-online-retail.json" >/dev/null
say "batch evaluation: $CUSTOMERS generated customers × $EVENTS_PER_CUSTOMER events"
"$LOADTEST" segment-batch --customers "$CUSTOMERS" --events-per-customer "$EVENTS_PER_CUSTOMER" --reps "$REPS" \
  --save "$RESULTS/segment-batch-2-generated.json" >/dev/null

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then commit="$commit (with uncommitted changes)"; fi
cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
ram=$(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)
"$LOADTEST" segment-report --results "$RESULTS" --out "$OUT" \
  --meta "Command=\`make bench-segments\` (\`bash bench/segments.sh\`): BENCH_SEG_CUSTOMERS=$CUSTOMERS BENCH_SEG_EVENTS_PER_CUSTOMER=$EVENTS_PER_CUSTOMER BENCH_SEG_REPS=$REPS BENCH_SEG_RATE=$RATE BENCH_SEG_DURATION=$DURATION" \
  --meta "Date=$(date -u '+%Y-%m-%d %H:%M UTC')" \
  --meta "Machine=$(nproc) vCPU ($cpu), $ram RAM, $(uname -sr); load generator, service, Postgres and RabbitMQ share it" \
  --meta "Postgres=$(psql "$PG_SERVER/$DB" -Atqc 'SHOW server_version')" \
  --meta "Service=\`relance serve events segmentation\` (release) for the real-time run; the batch runs use the segmentation store as a library on the same database" \
  --meta "Commit=$commit"
say "done: results in $RESULTS, summary in $OUT"
