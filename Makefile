# mlcanary: `make demo` runs the demo, `make test` runs the tests. Both create or reuse .venv.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := $(CURDIR)/.venv
BIN := $(VENV)/bin

# Airflow runs from the repo: its home, metadata DB and the demo warehouse live in .airflow/ (git-ignored).
export AIRFLOW_HOME ?= $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION := False
export AIRFLOW__API__HOST ?= 127.0.0.1
export AIRFLOW__API__PORT ?= 8080
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL ?= http://$(AIRFLOW__API__HOST):$(AIRFLOW__API__PORT)/execution/
export MLCANARY_WAREHOUSE ?= sqlite:///$(AIRFLOW_HOME)/warehouse.db
# The specs of running rollouts (their DAGs outlive an edit of the YAML): kept out of the repo.
export MLCANARY_SNAPSHOT_DIR ?= $(AIRFLOW_HOME)/running-specs
export AIRFLOW_CONN_MLCANARY_WAREHOUSE ?= {"conn_type": "sqlite", "host": "$(AIRFLOW_HOME)/warehouse.db"}
export PATH := $(BIN):$(PATH)

.PHONY: demo test lint ui ui-port simulate clean system-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.runtime: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

# Debian's prometheus + promtool, unpacked into the venv for the Prometheus tests (no system install).
$(VENV)/prometheus/usr/bin/prometheus: scripts/fetch_prometheus.sh | $(BIN)/python
	scripts/fetch_prometheus.sh $(VENV)/prometheus

# Debian's chromium at /usr/bin/chromium for the browser tests (Playwright drives it; never a Playwright
# browser download). Stamped only once it is there, so a machine without apt tries again next time.
$(VENV)/.chromium: scripts/fetch_chromium.sh | $(BIN)/python
	scripts/fetch_chromium.sh
	@if [ -x /usr/bin/chromium ]; then touch $@; fi

# Debian's docker-compose for tests/test_compose.py (validates docker-compose.yaml offline: `config`,
# nothing pulled or started). Stamped only once a compose is there, so a machine without apt tries again.
$(VENV)/.compose: scripts/fetch_compose.sh | $(BIN)/python
	scripts/fetch_compose.sh
	@if command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1; then touch $@; fi

# The outside oracles (gbstats, Evidently) in a venv of their own: their numpy and pandas conflict with ours.
$(VENV)/oracles/.installed: requirements-oracles.txt | $(BIN)/python
	$(PYTHON) -m venv $(VENV)/oracles
	$(VENV)/oracles/bin/pip install -q -r requirements-oracles.txt
	touch $@

demo: $(VENV)/.runtime  ## three real rollouts against the simulator (about 3 minutes)
	@mkdir -p $(AIRFLOW_HOME)
	$(BIN)/python scripts/demo.py

test: $(VENV)/.dev $(VENV)/prometheus/usr/bin/prometheus $(VENV)/.chromium $(VENV)/.compose $(VENV)/oracles/.installed lint  ## the whole test suite
	$(BIN)/pytest

# The distributed topology natively (CeleryExecutor, Redis, PostgreSQL, every component a process group)
# with its faults; `make test` runs it too. -s prints the figures.
system-test: $(VENV)/.dev  ## about 4 minutes
	$(BIN)/pytest -m system -s tests/test_system_celery.py

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# Before anything starts (or installs): an API port that is one of Airflow's own log-server ports is refused.
ui-port:
	@$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) scripts/check_ui_port.py

ui: ui-port $(VENV)/.runtime  ## Airflow UI on http://127.0.0.1:8080 with the simulator feeding traffic
	@mkdir -p $(AIRFLOW_HOME)
	$(BIN)/mlcanary init --warehouse $(MLCANARY_WAREHOUSE)
	$(BIN)/mlcanary simulate live --warehouse $(MLCANARY_WAREHOUSE) --model demo-ranker --rate 300 \
	    --error-rate 0.0005 --label-delay 2s --baseline-version v1 --fault "v3:latency_ms=300;min_percent=50" \
	    --fault "v4:ctr_drop=0.3" > $(AIRFLOW_HOME)/simulator.log 2>&1 & \
	  sim=$$!; trap "kill $$sim" EXIT; \
	  echo "simulator running (log: $(AIRFLOW_HOME)/simulator.log)"; \
	  echo "UI: http://$(AIRFLOW__API__HOST):$(AIRFLOW__API__PORT)  user: admin  password: see below"; \
	  $(BIN)/airflow standalone

simulate: $(VENV)/.runtime  ## the live simulator alone (Ctrl-C to stop)
	$(BIN)/mlcanary simulate live --warehouse $(MLCANARY_WAREHOUSE) --model demo-ranker --rate 300 \
	    --label-delay 2s --baseline-version v1

clean:
	rm -rf $(AIRFLOW_HOME) .pytest_cache .ruff_cache
