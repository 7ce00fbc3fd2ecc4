# The two commands: `make run` (embedded mode, nothing to install but Python
# packages) and `make test` (everything: unit, Postgres + Redis, browser).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
PORT ?= 8000
# The test suite's scaled-mode services (the machine's real Postgres and Redis).
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/tim3
TEST_REDIS_URL ?= redis://127.0.0.1:6379/15

.PHONY: run test setup services browser lint test-sqlite test-postgres reliability

run: setup
	$(PY) manage.py migrate --noinput
	$(PY) manage.py bootstrap
	$(PY) manage.py serve --port $(PORT)

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

services:
	bash scripts/ensure-services.sh

browser:
	bash scripts/ensure-chromium.sh

lint: setup
	$(VENV)/bin/ruff check .

# The money core once more on SQLite (embedded mode's database): exact integers there too.
SQLITE_TESTS ?= tests/test_engine.py tests/test_quantities.py tests/test_token.py tests/test_flows.py \
	tests/test_verify.py tests/test_drain_task.py tests/test_authority.py tests/test_websocket.py
test-sqlite: setup
	env -u DATABASE_URL -u REDIS_URL TIM3_VAR_DIR=$(CURDIR)/var/test-sqlite $(VENV)/bin/pytest -q $(SQLITE_TESTS)

test-postgres: setup services browser
	DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) $(VENV)/bin/pytest -q

test: lint test-sqlite test-postgres

# docs/reliability.md in one command: the fault-injection suite and every other test that
# writes figures to test-artifacts/reliability/ (found by grep), then the report from them.
# Exits non-zero if a producer failed (the report still shows what it found).
RELIABILITY_TESTS ?= tests/faults $(filter-out tests/faults/%,$(shell grep -rlE --include='test_*.py' 'test-artifacts.*reliability|"reliability"' tests | sort))

reliability: setup services
	@status=0; \
	DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) $(VENV)/bin/pytest -q $(RELIABILITY_TESTS) || status=$$?; \
	$(PY) scripts/reliability_report.py || [ $$status -ne 0 ] || status=1; \
	exit $$status
