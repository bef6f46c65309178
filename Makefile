# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_MODEL := build/demo-model
DEMO_DATA := build/demo-data/prompts.parquet

.PHONY: venv demo-assets demo test test-fast bench clean system-deps

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

# The tests spawn real MPI ranks (mpi4py's wheels need Open MPI's shared libraries). Where they are missing this
# installs them with apt, which needs root; otherwise it says what to install and stops.
system-deps:
	@if ! ldconfig -p 2>/dev/null | grep -q 'libmpi\.so\.40'; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Open MPI (apt-get install openmpi-bin libopenmpi-dev)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openmpi-bin libopenmpi-dev >/dev/null; \
	  else \
	    echo "make test needs Open MPI: run 'sudo apt-get install openmpi-bin libopenmpi-dev' (or your system's Open MPI 4+)"; \
	    exit 1; \
	  fi; \
	fi

test: system-deps demo-assets
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

test-fast: system-deps demo-assets
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(BIN)/python bench/memory.py

clean:
	rm -rf build out .pytest_cache
