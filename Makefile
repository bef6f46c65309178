# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_MODEL := build/demo-model
DEMO_DATA := build/demo-data/prompts.parquet

.PHONY: venv demo-assets demo test test-fast bench clean

$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch for dev/CI (constraints/cpu.txt); see DEVELOPERS.md
	$(BIN)/pip install -q -c constraints/cpu.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

$(DEMO_MODEL)/batchrun_demo.json: $(STAMP) batchrun/demo.py
	$(BIN)/python -m batchrun.demo --model $(DEMO_MODEL) --data $(DEMO_DATA)

demo-assets: $(DEMO_MODEL)/batchrun_demo.json

demo: demo-assets
	$(BIN)/batchrun run jobs/demo.yaml --overwrite

test: demo-assets
	$(BIN)/python -m pytest -q tests

test-fast: demo-assets
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(BIN)/python bench/memory.py

clean:
	rm -rf build out .pytest_cache
