# Ledger Node — the targets people expect. `make run` and `make test` install what they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install system-deps run test test-long check bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Debian packages the tests and benchmarks use (installed only when missing; needs root).
system-deps:
	@command -v softhsm2-util >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq softhsm2; }
	@command -v wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk; }

run: install
	$(VENV)/bin/ledger-node serve --host 127.0.0.1 --port 8080 --shards 4 --data-dir .ledger-data

# The whole suite (unit, property, sim, integration, e2e). pytest exits 5 when it collects
# no test; make treats that as a failure like any other non-zero exit.
test: install system-deps
	$(PY) -m pytest tests -q -ra $(PYTEST_ARGS)

test-long: install system-deps
	LEDGER_SIM_SEEDS=5000 $(PY) -m pytest tests -q -ra $(PYTEST_ARGS)

check: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: install system-deps
	$(PY) -m loadtests.bench

bench-quick: install system-deps
	$(PY) -m loadtests.bench --quick

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
