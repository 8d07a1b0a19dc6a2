# backstop: `make run` for the embedded demo, `make test` for the whole suite.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: install run test lint format bench redis-server clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

# The test suite and benchmarks start their own private Redis; only the binary is needed.
redis-server:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server with apt"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server >/dev/null; }

run: install
	$(VENV)/bin/backstop demo prune-broker
	$(VENV)/bin/backstop db upgrade
	$(VENV)/bin/backstop demo seed
	@# Ctrl-C stops every process; honcho then exits 130, which is the normal way out here.
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/honcho start -f Procfile || [ $$? -eq 130 ]

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: install redis-server lint
	$(PY) -m tests.services -- $(PY) -m pytest $(PYTEST_ARGS)

bench: install redis-server
	$(PY) -m tests.services -- $(PY) bench/holds.py

clean:
	rm -rf var .pytest_cache .hypothesis
