# One entry point for every check. `make test` is what CI runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export NUMBA_CACHE_DIR ?= $(CURDIR)/.numba_cache
LINT_DIRS := $(wildcard persia tests benchmarks examples)

.PHONY: install demo test lint typecheck unit bench-quick clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=24"
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/persia train examples/adult_income/job.yaml

lint: $(STAMP)
	$(BIN)/ruff format --check $(LINT_DIRS)
	$(BIN)/ruff check $(LINT_DIRS)

typecheck: $(STAMP)
	$(BIN)/mypy persia

unit: $(STAMP)
	$(BIN)/pytest -q

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/run_quick.py

test: lint typecheck unit bench-quick

clean:
	rm -rf $(VENV) .numba_cache .pytest_cache .mypy_cache .ruff_cache
