#!/usr/bin/env bash
# Load tests (`make loadtest SCENARIO=shop-day|ingestion-burst|black-friday`): the whole
# platform in-process (profiles, events, recommendations, campaigns, delivery, with the fake
# FCM) under a storefront's traffic, an ingestion burst, or a broadcast during the traffic.
# See loadtests/README.md for the scenarios.
#
# `relance-loadtest SCENARIO` runs the services on a database, RabbitMQ prefix and Redis
# prefix of its own (removed at the end), so no server is started here. Extra arguments for
# the scenario go in LOADTEST_ARGS (e.g. LOADTEST_ARGS="--audience 100000"). Results go to
# $CARGO_TARGET_DIR/loadtest/ (JSON, the run's output) and the `loadtest` section of
# BENCHMARKS.md (BENCH_OUT), which lists every scenario whose JSON is in that folder.
set -euo pipefail

cd "$(dirname "$0")/.."

SCENARIO=${SCENARIO:-${1:-shop-day}}
case "$SCENARIO" in
  shop-day|ingestion-burst|black-friday) ;;
  *) echo "SCENARIO must be shop-day, ingestion-burst or black-friday (got $SCENARIO)" >&2; exit 2 ;;
esac
ARGS=${LOADTEST_ARGS:-}
OUT=${BENCH_OUT:-BENCHMARKS.md}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
RESULTS=$TARGET_DIR/loadtest
PG_SERVER=postgres://postgres@127.0.0.1:5432

say() { printf '\033[1m==>\033[0m %s\n' "$*"; }

bash infra/dev.sh
say "building relance-loadtest (release)"
cargo build --release -p relance-loadtest
LOADTEST=$TARGET_DIR/release/relance-loadtest
mkdir -p "$RESULTS"

# What else is using the machine as the run starts (another build, a test run).
LOAD_BEFORE=$(awk '{ print $1 " " $2 " " $3 }' /proc/loadavg)
say "$SCENARIO $ARGS (load average before: $LOAD_BEFORE)"
started=$(date +%s)
# shellcheck disable=SC2086 # LOADTEST_ARGS is a list of arguments
"$LOADTEST" --save "$RESULTS/$SCENARIO.json" "$SCENARIO" $ARGS 2>&1 | tee "$RESULTS/$SCENARIO.txt"
elapsed=$(( $(date +%s) - started ))
LOAD_AFTER=$(awk '{ print $1 " " $2 " " $3 }' /proc/loadavg)
# Each scenario's line names the commit it ran: the section lists the latest run of each.
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then commit="$commit with uncommitted changes"; fi
echo "$SCENARIO: \`make loadtest SCENARIO=$SCENARIO${ARGS:+ LOADTEST_ARGS=\"$ARGS\"}\`, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $commit, whole run $elapsed s, load average before $LOAD_BEFORE · after $LOAD_AFTER" \
  >"$RESULTS/$SCENARIO.meta"

cpu=$(lscpu 2>/dev/null | awk -F': +' '/^Model name/ { print $2; exit }')
[ -n "$cpu" ] || cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
ram=$(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)
runs=()
for meta in "$RESULTS"/*.meta; do
  runs+=(--meta "Run=$(cat "$meta")")
done
"$LOADTEST" report --section loadtest --results "$RESULTS" --out "$OUT" \
  "${runs[@]}" \
  --meta "Machine=$(nproc) vCPU ($cpu), $ram RAM, $(uname -sr); load generator, services, fake FCM, Postgres, Redis and RabbitMQ share it" \
  --meta "Postgres=$(psql "$PG_SERVER/postgres" -Atqc 'SHOW server_version') · RabbitMQ $(rabbitmqctl version 2>/dev/null || echo '?')"
say "done in $elapsed s: results in $RESULTS, summary in $OUT"
