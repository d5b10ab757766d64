# One entry point for every check. `make test` is what CI runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export NUMBA_CACHE_DIR ?= $(CURDIR)/.numba_cache
LINT_DIRS := $(wildcard persia tests benchmarks examples)

.PHONY: install demo test lint typecheck unit bench-quick docs clean prometheus-install

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=24"
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,ray,serve]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/persia train examples/adult_income/job.yaml

lint: $(STAMP)
	$(BIN)/ruff format --check $(LINT_DIRS)
	$(BIN)/ruff check $(LINT_DIRS)

typecheck: $(STAMP)
	$(BIN)/mypy persia

unit: $(STAMP) prometheus-install
	$(BIN)/pytest -q

# Debian's Prometheus and Pushgateway, for the metrics integration tests (tests/telemetry/): the
# tests start them on free loopback ports. Installed once (skipped when both are on PATH), as root
# (CI is), with no recommended packages, and without starting their system services (a
# policy-rc.d refusing every start is put in place for the install when none exists).
prometheus-install:
	@if command -v prometheus >/dev/null && command -v prometheus-pushgateway >/dev/null; then \
		echo "prometheus and prometheus-pushgateway: installed"; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "prometheus-install: not root: install Debian's prometheus and" \
			"prometheus-pushgateway (tests/telemetry skips its Prometheus tests without them)"; \
	else \
		policy=/usr/sbin/policy-rc.d; made=; \
		if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' > $$policy; \
			chmod 755 $$policy; made=1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends prometheus prometheus-pushgateway >/dev/null; \
		status=$$?; if [ -n "$$made" ]; then rm -f $$policy; fi; exit $$status; \
	fi

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/run_quick.py

# The docs site with the API reference (mkdocs.yml); warnings are errors.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --quiet --site-dir site

test: lint typecheck unit bench-quick docs

clean:
	rm -rf $(VENV) .numba_cache .pytest_cache .mypy_cache .ruff_cache site

# TorchRec as a benchmark peer only (not a core dependency): installed beside the venv, not into
# it, and put on PYTHONPATH by benchmarks/bench_e2e.py for the torchrec-fused contender alone.
# These exact versions load with torch 2.13 on CPU (torchrec 1.9.0 and 1.7.0 do not).
TORCHREC_DIR := $(VENV)/bench-torchrec
.PHONY: bench-torchrec-install
bench-torchrec-install: $(STAMP)
	$(BIN)/pip install -q --no-deps --target $(TORCHREC_DIR) fbgemm-gpu-cpu==1.8.0
	$(BIN)/pip install -q --no-deps --target $(TORCHREC_DIR) torchrec==1.8.0 \
		tensordict==0.15.3 torchmetrics==1.0.3 lightning-utilities==0.15.3 \
		pyre-extensions==0.0.32 typing-inspect==0.9.0 mypy-extensions==1.2.0 \
		cloudpickle==3.1.3 orjson==3.13.0 pyvers==0.2.3 importlib-metadata==10.2.0 zipp==4.1.2

# fio (Debian) for benchmarks/bench_disk.py's random-read IOPS of this machine's disk; not part of
# `make test` (the benchmark reports the figure as skipped without it). lmdb and rocksdict, its
# key-value contenders, are the `bench` extra (pip install -e ".[bench]").
.PHONY: fio-install
fio-install:
	@if command -v fio >/dev/null; then echo "fio: installed"; \
	elif [ "$$(id -u)" != 0 ]; then echo "fio-install: not root: install Debian's fio"; exit 1; \
	else apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends fio >/dev/null; fi
