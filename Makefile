# homelab-dagster: `make up` runs the main job on the twin; `make test` runs the tests.
# Everything installs what it needs (uv, the Python environment, the twin's toolchain).

SHELL := /bin/bash
.DEFAULT_GOAL := help
ENV ?=
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)

.PHONY: help uv install system-deps tools twin images up preview dev screenshots test lint bench clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

uv: ## Install uv if it is missing
	@command -v uv >/dev/null 2>&1 || test -x $(HOME)/.local/bin/uv || python3 -m pip install --user --quiet uv

install: uv ## Create the environment from the lock file (with the ML extra), bytecode compiled
	@$(UV) sync --locked --extra ml --compile-bytecode

# etcd for the control planes; containerd, runc, the CNI plugins, iptables and docker-registry for
# the twin's real nodes (docs/twin.md: without them every node is a KWOK node); busybox-static for
# their test image; mmdebstrap, umoci and skopeo build the twin's images (`homelab twin images`).
SYSTEM_PACKAGES := etcd-server containerd runc containernetworking-plugins iptables busybox-static \
	docker-registry mmdebstrap umoci skopeo
# For the tests of Dagster's PostgreSQL storage and of the UI in a browser (no browser download).
TEST_PACKAGES := postgresql chromium chromium-driver

system-deps: ## Debian packages the twin needs (etcd, containerd, runc, CNI plugins, registry, image tools); as root, or prints the command
	@if ! command -v dpkg-query >/dev/null 2>&1; then \
	  command -v etcd >/dev/null 2>&1 || { echo "the twin needs etcd (and, for real nodes: containerd, runc, CNI plugins, iptables)"; exit 1; }; \
	else \
	  missing=""; for p in $(SYSTEM_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ]; then echo "installing$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing >/dev/null; \
	    else echo "the twin needs Debian packages; run: sudo apt-get install -y$$missing"; \
	      case "$$missing" in *etcd-server*) exit 1;; esac; \
	      echo "(only real nodes need the others, and real nodes need root: the twin runs every node as a KWOK node)"; fi; \
	  fi; \
	fi
	@# PostgreSQL (tests/test_postgres.py) and Chromium with its driver (tests/test_ui.py, make screenshots).
	@command -v dpkg-query >/dev/null 2>&1 || exit 0; missing=""; for p in $(TEST_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then :; elif [ "$$(id -u)" = 0 ]; then echo "installing$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing >/dev/null; \
	else echo "the PostgreSQL and browser tests skip without:$$missing (sudo apt-get install -y$$missing)"; fi

tools: install system-deps ## Build the twin's Go toolchain into ~/.cache (cold: about 35 min)
	@$(UV) run python -m infra.toolchain

twin: tools ## Start the twin (every cluster of the inventory)
	@$(UV) run homelab twin up

images: tools ## Build the twin's images from the lock files and push them (cached by content)
	@if $(UV) run python -c "import sys; from infra.images import missing_tools as m; sys.exit(bool(m()))"; \
	then $(UV) run homelab twin images; \
	else echo "images not built: $$($(UV) run python -c 'from infra.images import missing_tools as m; print(m())')"; fi

up: tools ## The main job on the twin, its images first (ENV=<cluster> for one cluster)
	@$(UV) run homelab up $(if $(ENV),--env $(ENV))

preview: tools ## What Pulumi would change, per resource (ENV=<cluster> for one cluster)
	@$(UV) run homelab preview $(if $(ENV),--env $(ENV))

reconcile-all: tools ## Look for drift in every stack, link and weights version, and repair it (auto-repair on)
	@$(UV) run homelab reconcile

dev: install ## The Dagster UI and daemon (`dg dev`) on http://127.0.0.1:3000 (PORT=<port>); Ctrl-C stops it
	@$(UV) run homelab dev $(if $(PORT),--port $(PORT))

screenshots: install ## Regenerate docs/images/*.png (docs/ui.md) from the UI tests in a browser
	@HOMELAB_UI_SCREENSHOTS=$(CURDIR)/docs/images $(UV) run pytest -p no:cacheprovider -q tests/test_ui.py

test: tools ## All tests
	@$(UV) run pytest

lint: install ## ruff (lint and format), mypy, and the layers (import-linter)
	@$(UV) run ruff check .
	@$(UV) run ruff format --check .
	@$(UV) run mypy homelab_dagster resources
	@$(UV) run lint-imports --no-cache

bench: tools ## Benchmarks (ratios against a baseline measured in the same run)
	@$(UV) run python benchmarks/definitions_load.py
	@$(UV) run python benchmarks/twin_up.py
	@$(UV) run python benchmarks/pulumi_noop.py
	@$(UV) run python benchmarks/train_throughput.py
	@$(UV) run python benchmarks/reconcile.py
	@$(UV) run python benchmarks/drift_repair.py
	@$(UV) run python benchmarks/weights_store.py

clean: ## Stop and delete the twin, then remove local state
	-@$(UV) run homelab twin down --purge
	rm -rf .homelab
