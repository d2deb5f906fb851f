# homelab-dagster: `make up` runs the main job on the twin; `make test` runs the tests.
# Everything installs what it needs (uv, the Python environment, the twin's toolchain).

SHELL := /bin/bash
.DEFAULT_GOAL := help
ENV ?=
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)

.PHONY: help uv install system-deps tools twin up preview dev test lint bench clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

uv: ## Install uv if it is missing
	@command -v uv >/dev/null 2>&1 || test -x $(HOME)/.local/bin/uv || python3 -m pip install --user --quiet uv

install: uv ## Create the environment from the lock file (with the ML extra), bytecode compiled
	@$(UV) sync --locked --extra ml --compile-bytecode

system-deps: ## Debian packages the twin needs (etcd); as root, or prints the command
	@command -v etcd >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq etcd-server >/dev/null; \
	  else echo "the twin needs etcd: sudo apt-get install etcd-server"; exit 1; fi; }

tools: install system-deps ## Build the twin's Go toolchain into ~/.cache (cold: about 35 min)
	@$(UV) run python -m infra.toolchain

twin: tools ## Start the twin (every cluster of the inventory)
	@$(UV) run homelab twin up

up: tools ## The main job on the twin (ENV=<cluster> for one cluster)
	@$(UV) run homelab up $(if $(ENV),--env $(ENV))

preview: tools ## What Pulumi would change, per resource (ENV=<cluster> for one cluster)
	@$(UV) run homelab preview $(if $(ENV),--env $(ENV))

dev: install ## The Dagster UI and daemon on http://127.0.0.1:3000
	@$(UV) run homelab dev

test: tools ## All tests
	@$(UV) run pytest

lint: install ## ruff (lint and format) and mypy
	@$(UV) run ruff check .
	@$(UV) run ruff format --check .
	@$(UV) run mypy homelab_dagster resources

bench: tools ## Benchmarks (ratios against a baseline measured in the same run)
	@$(UV) run python benchmarks/definitions_load.py
	@$(UV) run python benchmarks/twin_up.py
	@$(UV) run python benchmarks/pulumi_noop.py
	@$(UV) run python benchmarks/train_throughput.py

clean: ## Stop and delete the twin, then remove local state
	-@$(UV) run homelab twin down --purge
	rm -rf .homelab
