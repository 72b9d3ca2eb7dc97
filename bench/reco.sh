#!/usr/bin/env bash
# The recommendations benchmark (`bash bench/reco.sh`), on a fresh database:
#  1. Online Retail: `relance serve profiles events recommendations`, the whole UCI file
#     imported, a model trained with `relance reco train --seed-history` (wall time and peak
#     resident memory from /usr/bin/time -v); then `Recommend` against the no-op `Ping` (same
#     server stack, the baseline) at each of BENCH_RECO_RATES (1000 5000) requests/s, open
#     loop, for BENCH_RECO_DURATION seconds (20), and the most each answers per second with
#     BENCH_RECO_CONCURRENCY (64) requests in flight (closed loop).
#  2. A generated shop in its own workspace: BENCH_RECO_CUSTOMERS (1,000,000) customers and
#     BENCH_RECO_ITEMS (100,000) items, ~11 events per customer, written straight into
#     Postgres by `relance-loadtest reco-generate` (seed BENCH_RECO_SEED, 1), trained the same
#     way with the server stopped; the server restarted so that loading the model is timed
#     (its `model loaded` log lines); then the same runs.
# Results go to target/bench/reco/ (JSON, training outputs, server logs) and the `reco`
# section of BENCHMARKS.md (BENCH_OUT). The database (several GB) and the Redis keys of the
# run are removed at the end, also on failure, unless BENCH_RECO_KEEP_DB=1.
set -euo pipefail

cd "$(dirname "$0")/.."

CUSTOMERS=${BENCH_RECO_CUSTOMERS:-1000000}
ITEMS=${BENCH_RECO_ITEMS:-100000}
RATES=${BENCH_RECO_RATES:-1000 5000}
DURATION=${BENCH_RECO_DURATION:-20}
CONCURRENCY=${BENCH_RECO_CONCURRENCY:-64}
SEED=${BENCH_RECO_SEED:-1}
KEEP_DB=${BENCH_RECO_KEEP_DB:-0}
OUT=${BENCH_OUT:-BENCHMARKS.md}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
RESULTS=$TARGET_DIR/bench/reco
DATA=examples/data/online-retail.csv.gz
PG_SERVER=postgres://postgres@127.0.0.1:5432
DB=relance_bench_reco
GRPC_ADDR=127.0.0.1:50081
ADMIN_ADDR=127.0.0.1:9301
REDIS_URL=${RELANCE_REDIS_URL:-redis://127.0.0.1:6379}
REDIS_PREFIX=bench-reco:
WORKSPACE=bench
LARGE_WORKSPACE=bench-large

say() { printf '\033[1m==>\033[0m %s\n' "$*"; }
psql_bench() { psql "$PG_SERVER/$DB" -Atqc "$1"; }
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# --- Dependencies and binaries -----------------------------------------------------------
bash infra/dev.sh
say "building relance and relance-loadtest (release)"
cargo build --release -p relance -p relance-loadtest
RELANCE=$TARGET_DIR/release/relance
LOADTEST=$TARGET_DIR/release/relance-loadtest

for addr in "$GRPC_ADDR" "$ADMIN_ADDR"; do
  if port_open "${addr%:*}" "${addr#*:}"; then
    echo "error: $addr is already in use (a benchmark server left running?)" >&2
    exit 1
  fi
done
TIMER=()
if [ -x /usr/bin/time ]; then
  TIMER=(/usr/bin/time -v)
else
  echo "note: /usr/bin/time not found (apt-get install time): peak memory of training as the command reports it" >&2
fi

# --- A fresh database, no Redis keys left from an earlier run ------------------------------
drop_db() {
  PGOPTIONS='-c client_min_messages=warning' psql "$PG_SERVER/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
}
clear_redis() {
  if command -v redis-cli >/dev/null; then
    redis-cli -u "$REDIS_URL" --scan --pattern "$REDIS_PREFIX*" | xargs -r -n 1000 redis-cli -u "$REDIS_URL" unlink >/dev/null
  fi
}
say "creating a fresh database $DB"
drop_db
psql "$PG_SERVER/postgres" -qc "CREATE DATABASE $DB" >/dev/null
clear_redis
rm -rf "$RESULTS"
mkdir -p "$RESULTS"

export RELANCE_DATABASE_URL=$PG_SERVER/$DB
export RELANCE_GRPC_ADDR=$GRPC_ADDR
export RELANCE_ADMIN_ADDR=$ADMIN_ADDR
export RELANCE_AMQP_PREFIX=bench-reco.
export RELANCE_REDIS_PREFIX=$REDIS_PREFIX
# Warnings only, but the recommendations service's info lines: they carry `model loaded`.
export RELANCE_LOG_LEVEL=warn,relance_recommendations=info
# Training is what `relance reco train` times: the server's periodic training must not
# start one of its own in the middle of a run.
export RELANCE_RECOMMENDATIONS__TRAIN_EVERY_HOURS=0
export RELANCE_ADDR=http://$GRPC_ADDR
export BENCH_DATABASE_URL=$PG_SERVER/$DB
"$RELANCE" migrate >/dev/null

# --- The server ------------------------------------------------------------------------------
SERVER=""
start_server() { # start_server LOG
  "$RELANCE" serve profiles events recommendations >>"$1" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 480); do
    if ! kill -0 "$SERVER" 2>/dev/null; then
      echo "error: the server exited at start:" >&2
      tail -20 "$1" >&2
      exit 1
    fi
    if curl -sf "http://$ADMIN_ADDR/livez" >/dev/null && port_open "${GRPC_ADDR%:*}" "${GRPC_ADDR#*:}"; then return 0; fi
    sleep 0.25
  done
  echo "error: the server did not come up in 120 s" >&2
  exit 1
}
stop_server() {
  if [ -n "$SERVER" ] && kill -0 "$SERVER" 2>/dev/null; then
    kill -TERM "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
  fi
  SERVER=""
}
cleanup() {
  stop_server
  if [ "$KEEP_DB" = 1 ]; then
    echo "kept the database $DB and the Redis keys $REDIS_PREFIX* (BENCH_RECO_KEEP_DB=1)"
    return
  fi
  drop_db || true
  clear_redis || true
}
trap cleanup EXIT

# Resident memory of the server now, e.g. "812 MiB".
server_rss() {
  ps -o rss= -p "$SERVER" 2>/dev/null | awk '{ printf "%.0f MiB", $1 / 1024 }'
}

# A Prometheus counter of the server, 0 when absent.
counter() {
  curl -sf "http://$ADMIN_ADDR/metrics" | awk -v name="$1" '$1 == name { print int($2); found = 1 } END { if (!found) print 0 }'
}

# Waits (at most 180 s) until the events relay has published every accepted event, so that
# the import's backlog does not run into the timed runs.
wait_for_relay() {
  local accepted published
  for _ in $(seq 1 1800); do
    accepted=$(counter relance_events_accepted_total)
    published=$(counter relance_events_published_total)
    [ "$published" -ge "$accepted" ] && return 0
    sleep 0.1
  done
  echo "note: the relay is still $((accepted - published)) events behind" >&2
}

# What earlier steps wrote is vacuumed, analysed and flushed, and no autovacuum worker is
# left to steal CPU from the next measurement.
quiesce() {
  psql_bench "VACUUM (ANALYZE)" >/dev/null
  psql_bench "CHECKPOINT" >/dev/null
  for _ in $(seq 1 1200); do
    [ "$(psql "$PG_SERVER/postgres" -Atqc "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'")" = 0 ] && return 0
    sleep 0.1
  done
}

train() { # train WORKSPACE CATALOG [OPTIONS...]
  local workspace=$1 out=$RESULTS/train-$2.txt
  shift 2
  say "relance reco train --workspace $workspace --seed-history $*"
  if ! "${TIMER[@]}" "$RELANCE" reco train --workspace "$workspace" --seed-history "$@" >"$out" 2>&1; then
    echo "error: training $workspace failed:" >&2
    tail -30 "$out" >&2
    exit 1
  fi
  grep -E '^(trained version|peak memory)' "$out" || true
  grep -E 'Elapsed \(wall clock\)|Maximum resident set size' "$out" | sed 's/^[[:space:]]*/  /' || true
}

runs() { # runs CATALOG KEY IDS_ARGS...: Ping and Recommend at each rate, then closed loops
  local catalog=$1 key=$2 rate rpc
  shift 2
  for rate in $RATES; do
    for rpc in ping recommend; do
      say "$catalog: $rpc at $rate req/s for $DURATION s"
      RELANCE_API_KEY=$key "$LOADTEST" reco-latency --rpc "$rpc" --rate "$rate" --duration "$DURATION" \
        --seed "$rate" --wait-for-model 120 "$@" --out "$RESULTS/reco-latency-$catalog-$rate-$rpc.json"
    done
  done
  for rpc in ping recommend; do
    say "$catalog: $rpc, closed loop with $CONCURRENCY in flight for $DURATION s"
    RELANCE_API_KEY=$key "$LOADTEST" reco-max --rpc "$rpc" --concurrency "$CONCURRENCY" --duration "$DURATION" \
      --wait-for-model 120 "$@" --out "$RESULTS/reco-max-$catalog-$rpc.json"
  done
}

# --- 1. Online Retail ----------------------------------------------------------------------
say "starting relance serve profiles events recommendations on $GRPC_ADDR (log: $RESULTS/server-1.log)"
start_server "$RESULTS/server-1.log"
KEY=$("$RELANCE" key create --workspace "$WORKSPACE" --scope admin --name bench)
LARGE_KEY=$("$RELANCE" key create --workspace "$LARGE_WORKSPACE" --scope admin --name bench)

say "importing $DATA"
status=0
RELANCE_API_KEY=$KEY "$RELANCE" import online-retail "$DATA" --quiet >"$RESULTS/import.txt" 2>&1 || status=$?
sed -n '1,12p' "$RESULTS/import.txt"
# 3: imported, but some events were refused (counted in the summary above).
if [ "$status" != 0 ] && [ "$status" != 3 ]; then
  echo "error: the import failed:" >&2
  tail -20 "$RESULTS/import.txt" >&2
  exit 1
fi
wait_for_relay
quiesce
# The shop's invoices end on 2011-12-09: trained as of the next day, over its whole year.
train "$WORKSPACE" online-retail --cutoff 2011-12-10 --lookback-days 400
runs 1-online-retail "$KEY" --online-retail "$DATA"
RSS_RETAIL=$(server_rss)
stop_server

# --- 2. The generated shop -------------------------------------------------------------------
say "generating $CUSTOMERS customers and $ITEMS items into workspace $LARGE_WORKSPACE (server stopped)"
"$LOADTEST" reco-generate --workspace "$LARGE_WORKSPACE" --customers "$CUSTOMERS" --items "$ITEMS" \
  --seed "$SEED" --out "$RESULTS/reco-generate.json"
say "vacuum and analyse"
quiesce
train "$LARGE_WORKSPACE" generated

say "restarting the server (log: $RESULTS/server-2.log)"
start_server "$RESULTS/server-2.log"
runs 2-generated "$LARGE_KEY" --customers "$CUSTOMERS" --items "$ITEMS"
RSS_BOTH=$(server_rss)
# The loads at start (both workspaces); none when the service does not log them.
grep 'model loaded' "$RESULTS/server-2.log" >"$RESULTS/model-load.log" || true
stop_server

# --- BENCHMARKS.md ---------------------------------------------------------------------------
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then commit="$commit (with uncommitted changes)"; fi
cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
ram=$(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)
"$LOADTEST" reco-report --dir "$RESULTS" --out "$OUT" \
  --meta "Command=\`bash bench/reco.sh\`: BENCH_RECO_CUSTOMERS=$CUSTOMERS BENCH_RECO_ITEMS=$ITEMS BENCH_RECO_RATES=\"$RATES\" BENCH_RECO_DURATION=$DURATION BENCH_RECO_CONCURRENCY=$CONCURRENCY BENCH_RECO_SEED=$SEED" \
  --meta "Date=$(date -u '+%Y-%m-%d %H:%M UTC')" \
  --meta "Machine=$(nproc) vCPU ($cpu), $ram RAM, $(uname -sr); load generator, service, Postgres, Redis and RabbitMQ share it" \
  --meta "Postgres=$(psql "$PG_SERVER/postgres" -Atqc 'SHOW server_version')" \
  --meta "Service=\`relance serve profiles events recommendations\` (release), default settings, periodic training off" \
  --meta "Server memory (RSS) after the runs=${RSS_RETAIL:-?} with the Online Retail model · ${RSS_BOTH:-?} after restarting with both models" \
  --meta "Commit=$commit"
say "done: results in $RESULTS, summary in $OUT"
