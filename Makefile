# Relance — the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: demo test bench lint fmt services build

## Start PostgreSQL, Redis and RabbitMQ (installing them if needed), build, run the demo.
demo: services
	$(CARGO) run -p relance -- demo $(DEMO_ARGS)

## Every test, against the real servers.
test: services
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --no-fail-fast; \
	else \
		$(CARGO) test --workspace --no-fail-fast; \
	fi

## Benchmarks (release build); results are written to BENCHMARKS.md.
bench: services
	bash bench/run.sh

## Formatting and clippy, as CI would.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

build:
	$(CARGO) build --workspace

services:
	bash infra/dev.sh
