# Tessera — every thing a person does has a target here. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BOOT ?= python3.11
VENV        := .venv
PY          := $(VENV)/bin/python
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed
GEN_STAMP   := gen/.stamp
PROTOS      := $(shell find proto -name '*.proto' 2>/dev/null)
PYTEST      := $(PY) -m pytest
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: help venv gen lint test test-unit test-integration test-e2e run clean

help: ## List the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | sort | \
	  awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip==25.3
	$(PY) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	  print('\n'.join(p['dependencies'] + p['optional-dependencies']['dev']))" > $(VENV)/requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r $(VENV)/requirements.txt
	@# The services and the generated stubs are importable from the venv without an install step.
	@printf '%s\n%s\n%s\n%s\n' "$(CURDIR)/services" "$(CURDIR)/gen/python" "$(CURDIR)/gateway-envoy" \
	  "$(CURDIR)/clients/python" > \
	  $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/tessera-paths.pth
	@printf '#!/bin/sh\nexec "%s" -m tessera_runtime.cli "$$@"\n' "$(CURDIR)/$(PY)" > $(BIN)/tessera && chmod +x $(BIN)/tessera
	@touch $@

venv: $(STAMP) ## Create .venv and install the pinned dependencies

$(GEN_STAMP): $(STAMP) $(PROTOS) services/tessera_build/codegen.py
	$(PY) services/tessera_build/codegen.py
	@touch $@

gen: $(GEN_STAMP) ## Generate Python stubs (+ .pyi) and the Envoy descriptor set from proto/

lint: gen ## buf lint + buf breaking against main's history + ruff
	$(BIN)/buf lint
	$(PY) services/tessera_build/breaking.py
	$(BIN)/ruff check services tests bench clients gateway-envoy

test-unit: gen ## Unit tests: domain and handlers with fakes
	$(PYTEST) -m unit -q

test-integration: gen prometheus ## Integration tests: real servers on port 0, SQLite and PostgreSQL, RabbitMQ
	$(PYTEST) -m "integration" -q

test-e2e: gen ## End-to-end tests through the real Envoy gateway
	$(PYTEST) -m "e2e" -q

test: lint test-clients prometheus ## Everything: lint, the client suites, unit, integration, end to end
	$(PYTEST) -q

run: gen ## Start every service on embedded defaults (SQLite) and print where to reach it
	$(PY) -m tessera_runtime.devstack

clean: ## Remove generated code, build output and local data
	rm -rf gen build data .pytest_cache clients/ts/gen

# Prometheus, promtool, Alertmanager and amtool for the alerting rules' and routing's tests
# (tests/integration/prometheus/, tests/integration/test_alertmanager.py): Debian's packages, pinned, unpacked into
# the venv with dpkg -x, so nothing is installed as a system service and nothing starts.
.PHONY: prometheus
PROMETHEUS_DEB   := 2.42.0+ds-5+deb12u1
ALERTMANAGER_DEB := 0.25.0-1+b4
PROMETHEUS_DIR   := $(VENV)/prometheus
PROMETHEUS_STAMP := $(PROMETHEUS_DIR)/.installed-$(PROMETHEUS_DEB)-alertmanager-$(ALERTMANAGER_DEB)
PROMETHEUS_PKGS  := prometheus=$(PROMETHEUS_DEB) prometheus-alertmanager=$(ALERTMANAGER_DEB)

$(PROMETHEUS_STAMP):
	rm -rf $(PROMETHEUS_DIR) && mkdir -p $(PROMETHEUS_DIR)/deb
	cd $(PROMETHEUS_DIR)/deb && { apt-get download -q $(PROMETHEUS_PKGS) 2>/dev/null || \
	  { apt-get update -qq && apt-get download -q $(PROMETHEUS_PKGS); }; }
	dpkg -x $(PROMETHEUS_DIR)/deb/prometheus_*.deb $(PROMETHEUS_DIR)/root
	dpkg -x $(PROMETHEUS_DIR)/deb/prometheus-alertmanager_*.deb $(PROMETHEUS_DIR)/root
	rm -rf $(PROMETHEUS_DIR)/deb
	$(PROMETHEUS_DIR)/root/usr/bin/promtool --version
	$(PROMETHEUS_DIR)/root/usr/bin/amtool --version
	@touch $@

prometheus: $(PROMETHEUS_STAMP) ## Unpack Debian's prometheus and prometheus-alertmanager (pinned) into .venv/prometheus

.PHONY: k8s-mesh k8s-render k8s-validate k8s-alerts
k8s-alerts: gen ## Write the rules' SLO groups (from k8s/monitoring/slos.yaml), the PrometheusRule and AlertmanagerConfig
	$(PY) -m tessera_deploy.alerts

k8s-mesh: gen ## Regenerate istio/ routes, subsets and policies and the canary components from the contracts
	$(PY) -m tessera_deploy.mesh

k8s-render: gen ## Render every k8s overlay (with the generated gateway config) into build/k8s/<overlay>.yaml
	$(PY) -m tessera_deploy.render

k8s-validate: gen ## Validate every overlay offline: Kubernetes + Istio schemas and the semantic mesh checks
	$(PY) -m tessera_deploy.validate

# Clients generated from the contracts: Python (gen/python + typed gRPC stubs, clients/python/tessera_client) and
# TypeScript (clients/ts, generated into clients/ts/gen, git-ignored). npm installs from the committed lockfile only.
.PHONY: clients test-clients
CLIENTS_TS    := clients/ts
NODE_MODULES  := $(CLIENTS_TS)/node_modules/.package-lock.json
CLIENTS_STAMP := $(CLIENTS_TS)/gen/.stamp
CLIENTS_SRC   := $(shell find $(CLIENTS_TS)/src $(CLIENTS_TS)/test $(CLIENTS_TS)/examples -name '*.ts' 2>/dev/null) $(CLIENTS_TS)/tsconfig.json

$(NODE_MODULES): $(CLIENTS_TS)/package.json $(CLIENTS_TS)/package-lock.json
	cd $(CLIENTS_TS) && npm ci --ignore-scripts --no-audit --no-fund
	@touch $@

$(CLIENTS_STAMP): $(GEN_STAMP) $(NODE_MODULES) buf.gen.yaml $(CLIENTS_SRC)
	$(BIN)/buf generate
	rm -rf $(CLIENTS_TS)/gen/build
	cd $(CLIENTS_TS) && node_modules/.bin/tsc -p tsconfig.json
	@touch $@

clients: $(CLIENTS_STAMP) ## Generate the typed Python and TypeScript clients from proto/ (buf + protoc-gen-es, tsc)

test-clients: clients ## Node suite: TS client over native gRPC and REST (gateway) vs the Python client, real services
	$(PY) $(CLIENTS_TS)/test/stack.py -- node --test $(CLIENTS_TS)/gen/build/test/*.test.js

# The Envoy edge gateway (gateway-envoy/): config and OpenAPI generated from the contracts + gateway.yaml.
.PHONY: gateway-config openapi token demo
PROFILE ?= dev
SUB     ?= dev-admin
SCOPE   ?= admin
gateway-config: gen ## Write the Envoy bootstrap (PROFILE=dev|prod) to build/gateway/envoy-$(PROFILE).yaml and validate it
	$(PY) -m tessera_gateway.generate --profile $(PROFILE) --out build/gateway/envoy-$(PROFILE).yaml
	$(BIN)/envoy --mode validate -c build/gateway/envoy-$(PROFILE).yaml --use-dynamic-base-id --log-level warning

openapi: gen ## Write the OpenAPI 3.1 document of the REST API to build/gateway/openapi.json
	$(PY) -m tessera_gateway.openapi --profile $(PROFILE) --out build/gateway/openapi.json

token: $(STAMP) ## Print a dev token for the gateway: make token SUB=<user id> SCOPE="user:read order:write"
	@$(PY) -m tessera_runtime.cli token mint --sub "$(SUB)" --scope "$(SCOPE)"

demo: gen ## Scripted REST walk through the gateway: customer, products, an order, a declined order, read back
	$(PY) -m tessera_gateway.demo

# Benchmarks (bench/): each hot path against its baseline in the same run, alternating, reported as ratios in
# BENCHMARKS.md. A report, never a test: not part of `make test`. BENCH_ARGS passes options (python -m bench -h).
.PHONY: bench
bench: gen ## Benchmarks vs their baselines side by side (~5 min, 127.0.0.1 only); writes BENCHMARKS.md
	@command -v h2load >/dev/null && command -v wrk >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq nghttp2-client wrk; }
	$(PY) -m bench $(BENCH_ARGS)
