# kubetune: `make demo` runs the main flow, `make test` runs the tests.
# Both install what they need on first use (Go-built control plane and the
# Python environment, cached under ~/.cache/kubetune/).

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON_ENV = $$(bash hack/python-env.sh)
PY = "$(PYTHON_ENV)/bin/python"

export PYTHONPATH := $(CURDIR):$(CURDIR)/operator:$(CURDIR)/trainer_image
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export HF_UPDATE_DOWNLOAD_COUNTS := 0

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

.PHONY: tools
tools: ## Build the control-plane binaries and Kueue (first time only)
	@bash hack/build-tools.sh >/dev/null
	@bash hack/build-kueue.sh >/dev/null

.PHONY: env
env: ## Create the Python environment (first time only)
	@bash hack/python-env.sh >/dev/null

.PHONY: demo
demo: tools env ## The whole flow: local cluster, operator, a real fine-tuning job, its model
	@$(PY) -m kubetune.dev.demo

.PHONY: cluster-up
cluster-up: tools env ## Start the local cluster (kubeconfig under ~/.cache/kubetune/kwok)
	@$(PY) -m kubetune dev up

.PHONY: cluster-down
cluster-down: env ## Stop the local cluster and delete its state
	@$(PY) -m kubetune dev down

.PHONY: crds
crds: env ## Regenerate crds/ and the Helm chart's copy from the API models
	@$(PY) -m kubetune.api.crd

.PHONY: operator
operator: env ## Run the operator against the local cluster
	@$(PY) -m kubetune operator --kubeconfig "$$($(PY) -m kubetune dev kubeconfig)"

.PHONY: bench
bench: tools env ## Run the benchmarks (operator scale, trainer throughput, distributed scaling)
	@$(PY) bench/operator_scale.py
	@$(PY) bench/trainer_throughput.py
	@$(PY) bench/distributed.py

.PHONY: bench-peers
bench-peers: tools env ## Side by side with the Kubeflow training-operator (by hand; builds it once)
	@$(PY) bench/peers.py

.PHONY: bench-chaos
bench-chaos: tools env ## The operator under faults: SIGKILLs, API server and etcd restarts, takeovers
	@$(PY) bench/chaos.py

.PHONY: lint
lint: env ## Check formatting and lint with ruff
	@"$(PYTHON_ENV)/bin/ruff" format --check .
	@"$(PYTHON_ENV)/bin/ruff" check .

.PHONY: fmt
fmt: env ## Format and fix what ruff can
	@"$(PYTHON_ENV)/bin/ruff" format .
	@"$(PYTHON_ENV)/bin/ruff" check --fix .

.PHONY: test
test: tools env lint ## Lint, then run all tests (unit, integration on the local control plane)
	@$(PY) -m pytest $(PYTEST_ARGS) || { rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; fi; exit $$rc; }

.PHONY: unit
unit: env ## Run the unit tests only
	@$(PY) -m pytest tests/unit $(PYTEST_ARGS)
