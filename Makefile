# RSRefSeg: `make demo` (set up + CPU demo) and `make test` (set up + test suite).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TORCH_SPEC ?= torch==2.13.0
# Two pytest-xdist workers (the suite is mostly single-threaded subprocess and I/O work; 2 cores
# run it in about half the time of one process). `make test PYTEST_ARGS=` runs it in one process.
PYTEST_ARGS ?= -n 2

.PHONY: all venv demo test lint bench clean help qgis-plugin

help:
	@echo "make demo   - set up .venv, generate the NWPU referring set, train tiny on CPU (<=15 min), evaluate, predict"
	@echo "make test   - set up .venv and run ruff + the test suite"
	@echo "make bench  - benchmark suite incl. training (writes bench.json; with the bf16 agreement check after make demo)"
	@echo "make qgis-plugin - build dist/rsrefseg_qgis.zip (QGIS: Plugins > Install from ZIP)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU wheel of torch first, so nothing pulls a CUDA build.
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,app]"
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks qgis_plugin scripts

test: $(STAMP) lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	bash scripts/demo.sh

# With the demo's trained checkpoint (after `make demo`), also compare its bf16 and fp32 masks on NWPU val.
DEMO_DIR ?= work_dirs/nwpu-demo
DEMO_CKPT := $(DEMO_DIR)/run/checkpoints/best

bench: $(STAMP)
	@if [ -f "$(DEMO_CKPT)/config.json" ]; then \
		images="$$($(BIN)/python -c 'from rsrefseg.paths import nwpu_root; print(nwpu_root() / "images")')"; \
		set -x; $(BIN)/rsrefseg bench --out bench.json --agreement "$(DEMO_CKPT)" \
			--agreement-data "$(DEMO_DIR)/data/val.jsonl" --agreement-images "$$images" --train; \
	else \
		echo "(no $(DEMO_CKPT): run make demo first to include the bf16 agreement check)"; \
		set -x; $(BIN)/rsrefseg bench --out bench.json --train; \
	fi

# The QGIS plugin as an installable zip (standard library only; no venv needed).
qgis-plugin:
	$(PYTHON) scripts/build_qgis_plugin.py --out dist/rsrefseg_qgis.zip

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
