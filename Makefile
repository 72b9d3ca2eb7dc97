# Relance — the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: chaos demo test bench bench-ingest bench-segments bench-reco bench-delivery bench-campaigns loadtest lint fmt services build chart-lint fuzz

## Start PostgreSQL, Redis and RabbitMQ (installing them if needed), build, run the demo.
demo: services
	$(CARGO) run -p relance -- demo $(DEMO_ARGS)

## Every test, against the real servers.
test: services chart-lint
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --no-fail-fast; \
	else \
		$(CARGO) test --workspace --no-fail-fast; \
	fi

## Benchmarks (release build); results are written to BENCHMARKS.md.
bench: bench-ingest bench-segments bench-reco bench-delivery bench-campaigns

## Event ingestion: TrackBatch and Track against raw Postgres baselines.
bench-ingest: services
	bash bench/run.sh

## Segmentation: batch evaluation (Online Retail, 1 M generated) and Track → segment.entered.
bench-segments: services
	bash bench/segments.sh

## Recommendations: Recommend vs Ping at fixed rates and at saturation, training and model
## load on the Online Retail data and on a generated 100k-item / 1 M-customer shop.
bench-reco: services
	bash bench/reco.sh

## Delivery: messages/s through the whole send pipeline (queue → render with products →
## fake provider → ledger) for push and e-mail, with queue → provider latency, against the
## bus alone and the fake provider alone.
bench-delivery: services
	bash bench/delivery.sh

## Campaigns: due journey steps/s with 1 M pending and their lateness at 2,000/s, a broadcast
## to 1 M customers until every send request is published, against a raw SQL claim loop and
## the bus alone.
bench-campaigns: services
	bash bench/campaigns.sh

## Load tests of the whole platform (release build), in-process with the fake FCM:
## SCENARIO=shop-day (storefront sessions + abandoned-cart flow, event → push time),
## ingestion-burst (10× events for 30 s, relay backlog and drain) or black-friday (a broadcast
## to 1 M during shop traffic); LOADTEST_ARGS for the scenario's options. Writes BENCHMARKS.md.
SCENARIO ?= shop-day
loadtest: services
	SCENARIO=$(SCENARIO) bash bench/loadtest.sh

## Formatting and clippy, as CI would.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## The Helm chart: Helm's lint, a render through Helm's install, Kubernetes schemas.
chart-lint:
	bash infra/chart-lint.sh

## Fuzzing (cargo-fuzz, nightly): each target of fuzz/ for FUZZ_SECONDS (default 60) with
## -timeout=10 and -rss_limit_mb=2048; fails on any crash, hang or panic.
fuzz:
	bash fuzz/run.sh

build:
	$(CARGO) build --workspace

services:
	bash infra/dev.sh

## Failure tests: the platform under load while each service is killed and RabbitMQ, Redis
## and PostgreSQL restart (restarts this machine's servers: run it alone).
chaos: services
	bash bench/chaos.sh
