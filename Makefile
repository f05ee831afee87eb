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
	@printf '%s\n%s\n%s\n' "$(CURDIR)/services" "$(CURDIR)/gen/python" "$(CURDIR)/gateway-envoy" > \
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
	$(BIN)/ruff check services tests bench

test-unit: gen ## Unit tests: domain and handlers with fakes
	$(PYTEST) -m unit -q

test-integration: gen ## Integration tests: real servers on port 0, SQLite and PostgreSQL, RabbitMQ
	$(PYTEST) -m "integration" -q

test-e2e: gen ## End-to-end tests through the real Envoy gateway
	$(PYTEST) -m "e2e" -q

test: lint ## Everything: lint, unit, integration, end to end
	$(PYTEST) -q

run: gen ## Start every service on embedded defaults (SQLite) and print where to reach it
	$(PY) -m tessera_runtime.devstack

clean: ## Remove generated code, build output and local data
	rm -rf gen build data .pytest_cache
