# Common tasks, each a thin wrapper over scripts/ or the CLI (what CI runs is scripts/, not this
# file). `make` lists them; ARGS passes extra arguments, e.g. `make test ARGS="-k cli -x"` or
# `make serve ARGS="env=prod server.http_port=9000"`.
PYTHON ?= .venv/bin/python
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup setup-system test lint format serve plan check bench bench-proxy dashboards \
	build pre-commit

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(firstword $(MAKEFILE_LIST)) | \
		awk -F ':.*## ' '{ printf "  %-14s %s\n", $$1, $$2 }'

setup: ## .venv: Tiffin editable with the cpu and dev extras (scripts/setup)
	bash scripts/setup

setup-system: ## apt packages the tests start: Prometheus, PostgreSQL, ... (root or sudo)
	bash scripts/setup-system

test: ## lint and type-check, then pytest; ARGS go to pytest (scripts/test)
	bash scripts/test $(ARGS)

lint: ## ruff, ruff format --check, mypy --strict, bandit (scripts/lint)
	bash scripts/lint

format: ## apply ruff's formatting and its safe fixes
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

serve: ## serve the dev config on 127.0.0.1:3000; ARGS are Hydra overrides
	$(PYTHON) -m runtime serve $(ARGS)

plan: ## print the resolved start plan as JSON; ARGS are Hydra overrides
	$(PYTHON) -m runtime plan $(ARGS)

check: ## start the integrations once and health-check them; ARGS are Hydra overrides
	$(PYTHON) -m runtime check $(ARGS)

bench: ## local inference: llama.cpp direct vs Tiffin vs llama-cpp-python's server
	$(PYTHON) scripts/bench_inference.py $(ARGS)

bench-proxy: ## the proxy path and telemetry's cost (scripts/bench_proxy.py)
	$(PYTHON) scripts/bench_proxy.py $(ARGS)

dashboards: ## regenerate monitoring/grafana from runtime/integrations/grafana/dashboards.py
	$(PYTHON) -m runtime.cli.grafana_files

build: ## a Bento with the config baked in; ARGS: --gpu and Hydra overrides (env=prod ...)
	$(PYTHON) -m runtime build $(ARGS)

pre-commit: ## install the git pre-commit hook (.pre-commit-config.yaml)
	$(PYTHON) -m pre_commit install
