#!/usr/bin/env bash
# The ingestion benchmark (`make bench`): starts the events service on a fresh database,
# measures TrackBatch throughput against a raw Postgres baseline of the same rows, and single
# Track latency at a fixed rate, then writes the results into BENCHMARKS.md (the part between
# `<!-- ingest:begin -->` and `<!-- ingest:end -->` only).
#
# Each repetition runs, with a new seed: the raw INSERT … unnest baseline (service stopped),
# TrackBatch (service started, then left until its relay has published everything), the raw
# COPY baseline (service stopped). Track at a fixed rate comes last.
#
# Everything runs on this machine against 127.0.0.1, bounded in events and seconds. Knobs
# (environment): BENCH_EVENTS (per run, 200000), BENCH_REPS (3), BENCH_BATCH (500),
# BENCH_CONCURRENCY (4), BENCH_RATE (1000 req/s), BENCH_DURATION (20 s), BENCH_RELAY_WAIT
# (180 s), BENCH_OUT (BENCHMARKS.md). Each run's result stays in target/bench/ingest/*.json,
# the service's log in target/bench/ingest/server.log.
set -euo pipefail

cd "$(dirname "$0")/.."

EVENTS=${BENCH_EVENTS:-200000}
REPS=${BENCH_REPS:-3}
BATCH=${BENCH_BATCH:-500}
CONCURRENCY=${BENCH_CONCURRENCY:-4}
RATE=${BENCH_RATE:-1000}
DURATION=${BENCH_DURATION:-20}
OUT=${BENCH_OUT:-BENCHMARKS.md}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
RESULTS=$TARGET_DIR/bench/ingest
PG_SERVER=postgres://postgres@127.0.0.1:5432
DB=relance_bench
GRPC_ADDR=127.0.0.1:50061
ADMIN_ADDR=127.0.0.1:9191

say() { printf '\033[1m==>\033[0m %s\n' "$*"; }
psql_bench() { psql "$PG_SERVER/$DB" -Atqc "$1"; }

# --- Dependencies and binaries -----------------------------------------------------------
bash infra/dev.sh
say "building relance and relance-loadtest (release)"
cargo build --release -p relance -p relance-loadtest
RELANCE=$TARGET_DIR/release/relance
LOADTEST=$TARGET_DIR/release/relance-loadtest

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
for addr in "$GRPC_ADDR" "$ADMIN_ADDR"; do
  if port_open "${addr%:*}" "${addr#*:}"; then
    echo "error: $addr is already in use (a benchmark server left running?)" >&2
    exit 1
  fi
done

# --- A fresh database ----------------------------------------------------------------------
say "creating a fresh database $DB"
PGOPTIONS='-c client_min_messages=warning' psql "$PG_SERVER/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
psql "$PG_SERVER/postgres" -qc "CREATE DATABASE $DB" >/dev/null
rm -rf "$RESULTS"
mkdir -p "$RESULTS"

# --- The events service ------------------------------------------------------------------
export RELANCE_DATABASE_URL=$PG_SERVER/$DB
export RELANCE_GRPC_ADDR=$GRPC_ADDR
export RELANCE_ADMIN_ADDR=$ADMIN_ADDR
export RELANCE_AMQP_PREFIX=bench.
export RELANCE_LOG_LEVEL=warn

# The service runs only while it is being measured: the raw baseline runs with it stopped,
# so that its background work (the relay) does not slow the baseline down.
SERVER=""
start_server() {
  "$RELANCE" serve events >>"$RESULTS/server.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 240); do
    if ! kill -0 "$SERVER" 2>/dev/null; then
      echo "error: the events service exited at start:" >&2
      tail -20 "$RESULTS/server.log" >&2
      exit 1
    fi
    if curl -sf "http://$ADMIN_ADDR/livez" >/dev/null && port_open "${GRPC_ADDR%:*}" "${GRPC_ADDR#*:}"; then return 0; fi
    sleep 0.25
  done
  echo "error: the events service did not come up in 60 s" >&2
  exit 1
}
stop_server() {
  if [ -n "$SERVER" ] && kill -0 "$SERVER" 2>/dev/null; then
    kill -TERM "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
  fi
  SERVER=""
}
trap stop_server EXIT

say "starting relance serve events on $GRPC_ADDR (log: $RESULTS/server.log)"
start_server
RELANCE_API_KEY=$("$RELANCE" key create --workspace bench --scope admin --name bench)
export RELANCE_API_KEY
export RELANCE_ADDR=http://$GRPC_ADDR
export BENCH_DATABASE_URL=$PG_SERVER/$DB
stop_server

# A Prometheus counter of the service, 0 when absent.
counter() {
  curl -sf "http://$ADMIN_ADDR/metrics" | awk -v name="$1" '$1 == name { print int($2); found = 1 } END { if (!found) print 0 }'
}

# Waits (at most RELAY_WAIT seconds) until the relay has published every accepted event, so
# that its backlog does not run into the next timed run; prints how long that took.
RELAY_WAIT=${BENCH_RELAY_WAIT:-180}
wait_for_relay() {
  local started accepted published
  started=$(date +%s%N)
  for _ in $(seq 1 "$((RELAY_WAIT * 10))"); do
    accepted=$(counter relance_events_accepted_total)
    published=$(counter relance_events_published_total)
    if [ "$published" -ge "$accepted" ]; then
      awk -v from="$started" -v to="$(date +%s%N)" 'BEGIN { printf "%.1f s", (to - from) / 1e9 }'
      return 0
    fi
    sleep 0.1
  done
  printf 'not caught up after %s s (%s events behind)' "$RELAY_WAIT" "$((accepted - published))"
}

# Each timed run starts from a checkpoint, so that one run's dirty pages are not written
# during the next.
# Every run starts from the same state: what earlier runs wrote is vacuumed and analysed,
# flushed, and no autovacuum worker is left running to steal CPU from the next method (one
# vacuuming the previous run's table skewed whichever method came next).
quiesce() {
  psql_bench "VACUUM (ANALYZE)" >/dev/null
  psql_bench "CHECKPOINT" >/dev/null
  for _ in $(seq 1 600); do
    [ "$(psql "$PG_SERVER/postgres" -Atqc "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'")" = 0 ] && return 0
    sleep 0.1
  done
}

# --- Batched ingestion: TrackBatch vs raw, interleaved -------------------------------------
LOAD=(--events "$EVENTS" --batch "$BATCH" --concurrency "$CONCURRENCY")
RELAY_CATCHUP=""
for rep in $(seq 1 "$REPS"); do
  say "run $rep/$REPS: raw INSERT … unnest"
  quiesce
  "$LOADTEST" ingest-raw --method unnest --seed "$rep" "${LOAD[@]}" --save "$RESULTS/ingest-$rep-1-unnest.json"

  say "run $rep/$REPS: TrackBatch"
  start_server
  quiesce
  "$LOADTEST" ingest-batch --seed "$rep" "${LOAD[@]}" --save "$RESULTS/ingest-$rep-2-trackbatch.json"
  catchup=$(wait_for_relay)
  echo "relay backlog published in: $catchup"
  RELAY_CATCHUP="$RELAY_CATCHUP${RELAY_CATCHUP:+ · }$catchup"
  stop_server

  say "run $rep/$REPS: raw COPY"
  quiesce
  "$LOADTEST" ingest-raw --method copy --seed "$rep" "${LOAD[@]}" --save "$RESULTS/ingest-$rep-3-copy.json"
done

# --- Single Track at a fixed rate ------------------------------------------------------------
say "Track at $RATE req/s for $DURATION s"
STORED_BEFORE_TRACK=$(psql_bench "SELECT count(*) FROM events.events")
start_server
quiesce
"$LOADTEST" track-rate --rate "$RATE" --duration "$DURATION" --seed 1000 --save "$RESULTS/track-rate.json"
echo "relay backlog published in: $(wait_for_relay)"
stop_server
trap - EXIT

# --- BENCHMARKS.md ---------------------------------------------------------------------------
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then commit="$commit (with uncommitted changes)"; fi
cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
ram=$(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)
pg_version=$(psql_bench "SHOW server_version")
pg_settings=$(psql_bench "SELECT string_agg(name || '=' || setting || coalesce(unit, ''), ', ' ORDER BY name) FROM pg_settings WHERE name IN ('shared_buffers', 'synchronous_commit', 'fsync', 'max_wal_size', 'wal_level')")

"$LOADTEST" report --results "$RESULTS" --out "$OUT" \
  --meta "Command=\`make bench\` (\`bash bench/run.sh\`): BENCH_EVENTS=$EVENTS BENCH_REPS=$REPS BENCH_BATCH=$BATCH BENCH_CONCURRENCY=$CONCURRENCY BENCH_RATE=$RATE BENCH_DURATION=$DURATION" \
  --meta "Date=$(date -u '+%Y-%m-%d %H:%M UTC')" \
  --meta "Machine=$(nproc) vCPU ($cpu), $ram RAM, $(uname -sr); client, service, Postgres and RabbitMQ share it" \
  --meta "Postgres=$pg_version ($pg_settings)" \
  --meta "Service=\`relance serve events\` (release), default settings (10 database connections), log level warn" \
  --meta "Relay backlog (events still to publish to RabbitMQ) drained after each TrackBatch run in=$RELAY_CATCHUP" \
  --meta "Events already stored when the Track run started=$STORED_BEFORE_TRACK" \
  --meta "Commit=$commit"
say "done: results in $RESULTS, summary in $OUT"
