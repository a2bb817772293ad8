# biotune: `make help` lists the targets. Every target does the set-up it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PRESET ?= cpu
DEVICE ?=
export HF_HUB_OFFLINE ?= 1
export PYTHONHASHSEED ?= 0

.PHONY: help setup data rehearse test test-fast demo lint bench bench-parallel clean experiments ablations study figures notebooks notebooks-smoke tables reproduce

# `make reproduce demo`: the words after `reproduce` name tables, not targets
ifeq (reproduce,$(firstword $(MAKECMDGOALS)))
TABLE_NAMES := $(wordlist 2,$(words $(MAKECMDGOALS)),$(MAKECMDGOALS))
$(eval $(filter-out demo,$(TABLE_NAMES)):;@:)
endif

help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,notebooks,ray]'
	$(BIN)/python -m ipykernel install --user --name biotune --display-name "Python (biotune)" >/dev/null
	touch $(STAMP)

setup: $(STAMP)  ## .venv with pinned packages, the `biotune` Jupyter kernel, offline data
	@bash scripts/install_data.sh

data: $(STAMP)  ## PRESET=cpu: Debian's Fashion-MNIST (apt); else fetch what notebooks/$(PRESET).yaml needs
	@if [ "$(PRESET)" = cpu ]; then bash scripts/install_data.sh; \
	else $(BIN)/biotune data fetch notebooks/$(PRESET).yaml; fi

rehearse: setup  ## the paper plan on fake datasets, random weights, a tiny budget (about 2 min on 2 cores; DEVICE=cuda)
	rm -rf results/rehearse
	$(BIN)/biotune data fakes results/rehearse/data
	$(BIN)/biotune notebooks run notebooks/rehearse.yaml --output-dir results/rehearse/notebooks $(if $(DEVICE),-p device=$(DEVICE))

test: setup  ## the whole test suite (CPU, offline)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)  ## tests not marked slow
	$(BIN)/python -m pytest -q -m "not slow"

tables: $(STAMP)  ## regenerate the tables in README.md and docs/ from the committed results files
	$(BIN)/python -m biotune.tables write

reproduce: setup  ## rerun the command behind a published table, compare side by side (make reproduce demo)
	@test -n "$(TABLE_NAMES)" || { echo "name a table: make reproduce demo"; exit 2; }
	@for name in $(TABLE_NAMES); do $(BIN)/python -m biotune.tables reproduce $$name || exit $$?; done

demo: setup  ## small search + final protocol vs full FT and linear probing (a few minutes on 2 cores)
	$(if $(TABLE_NAMES),@:,$(BIN)/biotune demo)

bench: setup  ## plain PyTorch loop vs levers off vs exact levers vs pruning, side by side (PRESET=cpu)
	$(BIN)/biotune bench evaluations --preset $(PRESET) --json results/bench_$(PRESET).json $(if $(DEVICE),--train.device $(DEVICE))

bench-parallel: setup  ## one demo search with each executor (serial, process, ray; 1 and 2 workers), side by side
	$(BIN)/biotune bench parallel --preset demo --json results/bench_parallel_demo.json $(if $(DEVICE),--train.device $(DEVICE))

NOTEBOOKS = $(BIN)/biotune notebooks run notebooks/$(PRESET).yaml $(if $(DEVICE),-p device=$(DEVICE)) $(if $(FORCE),--force)

experiments: setup  ## notebook 01: datasets x models x methods (PRESET=cpu|paper, DEVICE=auto|cuda)
	$(NOTEBOOKS) --only 01_main_experiments

ablations: setup  ## notebook 02: no LR genes, no freezing, population sizes, GA variant, searchers
	$(NOTEBOOKS) --only 02_ablations

study: setup  ## notebook 04: datasets x methods x seeds, means with intervals, paired tests (results/study/)
	$(NOTEBOOKS) --only 04_study

figures: setup  ## notebook 03: figures from the run store (PNG + PDF under results/figures/)
	$(NOTEBOOKS) --only 03_figures

notebooks: setup  ## the whole plan notebooks/$(PRESET).yaml (FORCE=1 reruns finished notebooks)
	$(NOTEBOOKS)

notebooks-smoke: $(STAMP)  ## every notebook with the smoke plan (about a minute)
	$(BIN)/biotune notebooks run notebooks/smoke.yaml $(if $(FORCE),--force)

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check biotune tests

clean:  ## remove the virtual environment and caches (keeps data/ and results/)
	rm -rf $(VENV) .pytest_cache .ruff_cache
