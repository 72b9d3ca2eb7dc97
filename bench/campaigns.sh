#!/usr/bin/env bash
# The campaigns benchmark (part of `make bench`, alone with `make bench-campaigns`):
#  1. due steps processed per second with 1 M pending journeys (200,000 due at once),
#  2. the lateness of due steps at a steady 2,000/s over 60 s on top of the 1 M pending,
#  3. a broadcast to 1 M customers: ScheduleBroadcast → all recipients written → all send
#     requests in the outbox → all published to RabbitMQ,
# against two baselines measured in the same run: a raw SQL loop doing only the claim and
# the journey UPDATE (the floor under 1), and the bus alone for 1 M envelopes of the same
# size (the floor under 3c).
#
# `relance-loadtest campaigns` runs profiles and campaigns in-process on a database, RabbitMQ
# prefix and Redis prefix of its own (removed at the end), with fake segmentation and
# delivery gRPC servers, so no server is started here. Sizes: BENCH_CAMPAIGNS_PENDING
# (1,000,000 journeys), BENCH_CAMPAIGNS_DUE (200,000 of them due at once),
# BENCH_CAMPAIGNS_PACED_RATE (2,000/s) for BENCH_CAMPAIGNS_PACED_SECS (60),
# BENCH_CAMPAIGNS_AUDIENCE (1,000,000); the service's `[campaigns]` settings:
# BENCH_CAMPAIGNS_WORKERS (2), BENCH_CAMPAIGNS_BATCH (500), BENCH_CAMPAIGNS_POLL_MS (200),
# BENCH_CAMPAIGNS_BROADCAST_BATCH (2000). The run is cut after BENCH_CAMPAIGNS_MAX_SECS (870).
# Results go to target/bench/campaigns/ (JSON, the run's output) and the `campaigns` section
# of BENCHMARKS.md (BENCH_OUT).
set -euo pipefail

cd "$(dirname "$0")/.."

PENDING=${BENCH_CAMPAIGNS_PENDING:-1000000}
DUE=${BENCH_CAMPAIGNS_DUE:-200000}
PACED_RATE=${BENCH_CAMPAIGNS_PACED_RATE:-2000}
PACED_SECS=${BENCH_CAMPAIGNS_PACED_SECS:-60}
AUDIENCE=${BENCH_CAMPAIGNS_AUDIENCE:-1000000}
WORKERS=${BENCH_CAMPAIGNS_WORKERS:-2}
BATCH=${BENCH_CAMPAIGNS_BATCH:-500}
POLL_MS=${BENCH_CAMPAIGNS_POLL_MS:-200}
BROADCAST_BATCH=${BENCH_CAMPAIGNS_BROADCAST_BATCH:-2000}
MAX_SECS=${BENCH_CAMPAIGNS_MAX_SECS:-870}
OUT=${BENCH_OUT:-BENCHMARKS.md}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
RESULTS=$TARGET_DIR/bench/campaigns
PG_SERVER=postgres://postgres@127.0.0.1:5432

say() { printf '\033[1m==>\033[0m %s\n' "$*"; }

bash infra/dev.sh
say "building relance-loadtest (release)"
cargo build --release -p relance-loadtest
LOADTEST=$TARGET_DIR/release/relance-loadtest

rm -rf "$RESULTS"
mkdir -p "$RESULTS"

# What else is using the machine as the run starts (another build, a test run).
LOAD_BEFORE=$(awk '{ print $1 " " $2 " " $3 }' /proc/loadavg)
say "campaigns: $PENDING pending journeys ($DUE due), $PACED_RATE/s for $PACED_SECS s, a broadcast to $AUDIENCE (load average before: $LOAD_BEFORE)"
started=$(date +%s)
timeout --signal=INT --kill-after=30 "$MAX_SECS" "$LOADTEST" --save "$RESULTS/campaigns.json" campaigns \
  --pending "$PENDING" --due "$DUE" --paced-rate "$PACED_RATE" --paced-secs "$PACED_SECS" \
  --audience "$AUDIENCE" --workers "$WORKERS" --batch "$BATCH" --poll-ms "$POLL_MS" \
  --broadcast-batch "$BROADCAST_BATCH" \
  2>&1 | tee "$RESULTS/run.txt"
elapsed=$(( $(date +%s) - started ))
LOAD_AFTER=$(awk '{ print $1 " " $2 " " $3 }' /proc/loadavg)

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then commit="$commit (with uncommitted changes)"; fi
cpu=$(lscpu 2>/dev/null | awk -F': +' '/^Model name/ { print $2; exit }')
[ -n "$cpu" ] || cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
ram=$(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)
"$LOADTEST" report --section campaigns --results "$RESULTS" --out "$OUT" \
  --meta "Command=\`bash bench/campaigns.sh\`: BENCH_CAMPAIGNS_PENDING=$PENDING BENCH_CAMPAIGNS_DUE=$DUE BENCH_CAMPAIGNS_PACED_RATE=$PACED_RATE BENCH_CAMPAIGNS_PACED_SECS=$PACED_SECS BENCH_CAMPAIGNS_AUDIENCE=$AUDIENCE BENCH_CAMPAIGNS_WORKERS=$WORKERS BENCH_CAMPAIGNS_BATCH=$BATCH BENCH_CAMPAIGNS_POLL_MS=$POLL_MS BENCH_CAMPAIGNS_BROADCAST_BATCH=$BROADCAST_BATCH" \
  --meta "Date=$(date -u '+%Y-%m-%d %H:%M UTC'), whole run $elapsed s" \
  --meta "Machine=$(nproc) vCPU ($cpu), $ram RAM, $(uname -sr); load generator, services, fakes, Postgres, Redis and RabbitMQ share it" \
  --meta "Load average (1, 5, 15 min)=before $LOAD_BEFORE · after $LOAD_AFTER" \
  --meta "Postgres=$(psql "$PG_SERVER/postgres" -Atqc 'SHOW server_version') (shared_buffers $(psql "$PG_SERVER/postgres" -Atqc 'SHOW shared_buffers'), synchronous_commit $(psql "$PG_SERVER/postgres" -Atqc 'SHOW synchronous_commit')) · RabbitMQ $(rabbitmqctl version 2>/dev/null || echo '?')" \
  --meta "Commit=$commit"
say "done in $elapsed s: results in $RESULTS, summary in $OUT"
