#!/usr/bin/env bash
# The delivery benchmark (part of `make bench`, alone with `make bench-delivery`): messages/s
# through the delivery service's whole pipeline — queue → ledger → profile → products block
# (Recommend) → render → fake provider → ledger — for push (the fake FCM) and e-mail (aiosmtpd),
# with each message's queue-to-provider latency, against two baselines measured in the same
# run: the bus alone and the fake provider alone.
#
# `relance-loadtest delivery` runs profiles, events, recommendations and delivery in-process
# on a database, RabbitMQ prefix and Redis prefix of its own (removed at the end), so no
# server is started here. Sizes: BENCH_DELIVERY_CUSTOMERS (20,000), BENCH_DELIVERY_ITEMS
# (2,000), BENCH_DELIVERY_ORDERS (30,000 order_completed events before training),
# BENCH_DELIVERY_PUSH (50,000) and BENCH_DELIVERY_EMAIL (10,000) messages; the service's
# BENCH_DELIVERY_BATCH (256), BENCH_DELIVERY_PREFETCH (1024), BENCH_DELIVERY_CONCURRENCY (256).
# Results go to target/bench/delivery/ (JSON, the run's output) and the `delivery` section
# of BENCHMARKS.md (BENCH_OUT).
set -euo pipefail

cd "$(dirname "$0")/.."

CUSTOMERS=${BENCH_DELIVERY_CUSTOMERS:-20000}
ITEMS=${BENCH_DELIVERY_ITEMS:-2000}
ORDERS=${BENCH_DELIVERY_ORDERS:-30000}
PUSH=${BENCH_DELIVERY_PUSH:-50000}
EMAIL=${BENCH_DELIVERY_EMAIL:-10000}
PUSH_RATE=${BENCH_DELIVERY_PUSH_RATE:-1000}
PACED_SECS=${BENCH_DELIVERY_PACED_SECS:-20}
BATCH=${BENCH_DELIVERY_BATCH:-256}
PREFETCH=${BENCH_DELIVERY_PREFETCH:-1024}
CONCURRENCY=${BENCH_DELIVERY_CONCURRENCY:-256}
OUT=${BENCH_OUT:-BENCHMARKS.md}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
RESULTS=$TARGET_DIR/bench/delivery
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
say "delivery: $CUSTOMERS customers, $PUSH push and $EMAIL e-mails (load average before: $LOAD_BEFORE)"
started=$(date +%s)
"$LOADTEST" --save "$RESULTS/delivery.json" delivery \
  --customers "$CUSTOMERS" --items "$ITEMS" --orders "$ORDERS" \
  --push "$PUSH" --email "$EMAIL" --push-rate "$PUSH_RATE" --paced-secs "$PACED_SECS" \
  --batch "$BATCH" --prefetch "$PREFETCH" --concurrency "$CONCURRENCY" \
  2>&1 | tee "$RESULTS/run.txt"
elapsed=$(( $(date +%s) - started ))
LOAD_AFTER=$(awk '{ print $1 " " $2 " " $3 }' /proc/loadavg)

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then commit="$commit (with uncommitted changes)"; fi
cpu=$(lscpu 2>/dev/null | awk -F': +' '/^Model name/ { print $2; exit }')
[ -n "$cpu" ] || cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
ram=$(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)
"$LOADTEST" report --section delivery --results "$RESULTS" --out "$OUT" \
  --meta "Command=\`bash bench/delivery.sh\`: BENCH_DELIVERY_CUSTOMERS=$CUSTOMERS BENCH_DELIVERY_ITEMS=$ITEMS BENCH_DELIVERY_ORDERS=$ORDERS BENCH_DELIVERY_PUSH=$PUSH BENCH_DELIVERY_EMAIL=$EMAIL BENCH_DELIVERY_PUSH_RATE=$PUSH_RATE BENCH_DELIVERY_PACED_SECS=$PACED_SECS BENCH_DELIVERY_BATCH=$BATCH BENCH_DELIVERY_PREFETCH=$PREFETCH BENCH_DELIVERY_CONCURRENCY=$CONCURRENCY" \
  --meta "Date=$(date -u '+%Y-%m-%d %H:%M UTC'), whole run $elapsed s" \
  --meta "Machine=$(nproc) vCPU ($cpu), $ram RAM, $(uname -sr); load generator, services, fakes, Postgres, Redis and RabbitMQ share it" \
  --meta "Load average (1, 5, 15 min)=before $LOAD_BEFORE · after $LOAD_AFTER" \
  --meta "Postgres=$(psql "$PG_SERVER/postgres" -Atqc 'SHOW server_version') · RabbitMQ $(rabbitmqctl version 2>/dev/null || echo '?')" \
  --meta "Commit=$commit"
say "done in $elapsed s: results in $RESULTS, summary in $OUT"
