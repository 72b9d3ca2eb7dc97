#!/usr/bin/env bash
# `make chaos`: the whole platform (six `relance serve <service>` processes) under load while
# each service is killed with SIGKILL in turn, then RabbitMQ, Redis (its data gone) and
# PostgreSQL restart. Prints the time to recover from each fault and checks that no
# acknowledged event was lost, no push was missed and none was sent twice; writes the
# `chaos` section of BENCHMARKS.md (BENCH_OUT). Exit code 1 when a check fails.
#
# It restarts this machine's RabbitMQ, Redis and PostgreSQL: run it on a machine of its own,
# never beside `make test` or a benchmark. CHAOS_ARGS passes options to
# `relance-loadtest chaos` (e.g. `--services-only`, `--signups-per-sec 20`, `--keep`).
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET_DIR=${CARGO_TARGET_DIR:-target}
OUT=${BENCH_OUT:-BENCHMARKS.md}
say() { printf '\033[1m==>\033[0m %s\n' "$*"; }

say "building relance and relance-loadtest (release)"
cargo build --release -p relance -p relance-loadtest
say "chaos run (about $(( (9 + 1) * 20 / 60 + 2 )) minutes)"
# shellcheck disable=SC2086
"$TARGET_DIR/release/relance-loadtest" chaos \
  --relance "$TARGET_DIR/release/relance" \
  --out "$TARGET_DIR/chaos" \
  --benchmarks "$OUT" \
  ${CHAOS_ARGS:-}
