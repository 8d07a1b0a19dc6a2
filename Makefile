# backstop: `make run` for the embedded demo, `make test` for the whole suite.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: install lock run test lint format alert-rules bench redis-server postgresql chromium promtool node-deps screenshot clean

# Dependencies come from the lock alone (hash-checked, nothing resolved at install time), then
# backstop itself; `pip check` fails when pyproject.toml asks for what the lock does not pin.
# requirements/dev.txt is production's lock plus the demo and test extras, at the same pins.
LOCK := requirements/dev.txt
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	$(PY) -m pip check
	@touch $(STAMP)

install: $(STAMP)

# Refresh both locks from pyproject.toml, keeping every pin the ranges still allow: production
# first (the Docker image installs it), then dev constrained to it, so the two never disagree.
# `make lock LOCK_ARGS=--upgrade` moves every pin to the newest allowed release,
# `LOCK_ARGS="--upgrade-package stripe"` one package. Then `make test`, and commit the locks.
UV_PIN := $(shell grep -o 'uv==[0-9.]*' pyproject.toml)
UV_COMPILE := UV_CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/uv pip compile pyproject.toml \
	--python-version 3.11 --universal --generate-hashes --quiet $(LOCK_ARGS)
lock:
	@test -x $(PY) || python3 -m venv $(VENV)
	@test "$$($(VENV)/bin/uv --version 2>/dev/null | cut -d' ' -f2)" = "$(UV_PIN:uv==%=%)" || \
	  $(PY) -m pip install --quiet --disable-pip-version-check "$(UV_PIN)"
	$(UV_COMPILE) -o requirements/production.txt
	$(UV_COMPILE) --extra demo --extra test -c requirements/production.txt -o requirements/dev.txt

# The test suite and benchmarks start their own private Redis; only the binary is needed.
redis-server:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server with apt"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server >/dev/null; }

# Likewise PostgreSQL: the server binaries the harness looks for (`python3 -m tests.services
# --find-postgres` says which). Debian 12's server is postgresql-15, the major production runs
# (docker-compose.yml); where there is none, the distribution's default major.
postgresql:
	@python3 -m tests.services --find-postgres >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  pkg=$$(apt-cache show postgresql-15 >/dev/null 2>&1 && echo postgresql-15 || echo postgresql) && \
	  echo "installing $$pkg with apt" && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$pkg >/dev/null && \
	  python3 -m tests.services --find-postgres; }

# The console's browser tests drive Debian's headless Chromium through Playwright.
chromium:
	@command -v chromium >/dev/null || { \
	  echo "installing chromium with apt"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

# promtool checks and unit-tests the Prometheus alert rules (deploy/prometheus/). Debian ships it
# only in the `prometheus` package; without recommends that is the server and a few JS libraries.
promtool:
	@command -v promtool >/dev/null || { \
	  echo "installing prometheus (for promtool) with apt"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

# The Node.js client test enqueues tasks with the `celery-node` npm package (tests/node).
node-deps: tests/node/node_modules/.installed-stamp
tests/node/node_modules/.installed-stamp: tests/node/package.json tests/node/package-lock.json
	@command -v npm >/dev/null || { \
	  echo "installing nodejs and npm with apt"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq nodejs npm >/dev/null; }
	npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
	@touch $@

# `make run` points both gateways at the local simulator unless real (test) keys are set in
# the environment: then it talks to Razorpay and Stripe and starts no simulator.
SIMULATOR := http://127.0.0.1:8765
ifeq ($(RAZORPAY_KEY_ID)$(STRIPE_API_KEY),)
run: export RAZORPAY_KEY_ID := rzp_test_sim
run: export RAZORPAY_KEY_SECRET := sim_secret
run: export RAZORPAY_BASE_URL := $(SIMULATOR)
run: export STRIPE_API_KEY := sk_test_sim
run: export STRIPE_API_BASE := $(SIMULATOR)
run: PROCESSES := simulator: backstop simulator --port 8765 --demo
endif

# Likewise SMS and push go to the local notification sandbox unless a provider URL is set;
# the demo retries after a few seconds instead of a minute.
NOTIFY_SANDBOX := http://127.0.0.1:8766
ifeq ($(SMS_PROVIDER_URL)$(PUSH_PROVIDER_URL),)
run: export SMS_PROVIDER_URL := $(NOTIFY_SANDBOX)
run: export SMS_PROVIDER_API_KEY := sandbox-key
run: export PUSH_PROVIDER_URL := $(NOTIFY_SANDBOX)
run: export PUSH_PROVIDER_API_KEY := sandbox-key
run: export NOTIFY_BACKOFF_SECONDS ?= 5
run: NOTIFY_PROCESSES := notify-sandbox: backstop notify-sandbox --port 8766 --demo
endif

run: install
	$(VENV)/bin/backstop demo prune-broker
	$(VENV)/bin/backstop db upgrade
	$(VENV)/bin/backstop demo seed
	@mkdir -p var && { cat Procfile; echo "$(PROCESSES)"; echo "$(NOTIFY_PROCESSES)"; } > var/Procfile.run
	@# The demo user of the console and Flower: a password made once and kept in var/, printed
	@# at start. Flower 2 refuses its API without auth, so it gets the same user.
	@test -s var/console-demo-password || $(PY) -c "import secrets; print(secrets.token_urlsafe(12))" > var/console-demo-password
	@# Ctrl-C stops every process; honcho then exits 130, which is the normal way out here.
	@pw=$$(cat var/console-demo-password); \
	export CONSOLE_USERS="demo:operator:$$($(VENV)/bin/backstop console hash-password --password "$$pw")"; \
	export CONSOLE_SECRET_KEY="$$pw-demo-session-key" CONSOLE_COOKIE_SECURE=false; \
	export FLOWER_BASIC_AUTH="demo:$$pw"; \
	echo "console: http://127.0.0.1:8000  (user demo, password $$pw)"; \
	echo "flower:  http://127.0.0.1:5555  (user demo, the same password)"; \
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/honcho start -f var/Procfile.run || [ $$? -eq 130 ]

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The Prometheus alert rules: valid, and their unit tests pass (deploy/prometheus/alerts_test.yml).
alert-rules: promtool
	promtool check rules deploy/prometheus/alerts.yml
	cd deploy/prometheus && promtool test rules alerts_test.yml

test: install redis-server postgresql chromium promtool node-deps lint alert-rules
	$(PY) -m tests.services -- $(PY) -m pytest $(PYTEST_ARGS)

bench: install redis-server postgresql
	$(PY) -m tests.services -- $(PY) bench/holds.py
	$(PY) -m tests.services -- $(PY) bench/refunds.py
	$(PY) -m tests.services -- $(PY) bench/notifications.py
	$(PY) -m tests.services -- $(PY) bench/dlq.py
	$(PY) -m tests.services -- $(PY) bench/reconcile.py
	$(PY) -m tests.services -- $(PY) bench/defer.py
	$(PY) -m tests.services -- $(PY) bench/faults.py
	$(PY) -m tests.services -- $(PY) bench/console.py
	$(PY) -m tests.services -- $(PY) bench/outage.py

# docs/flower.png: Flower with backstop's tasks, shot by headless Chromium (needs `chromium`).
screenshot: install redis-server postgresql chromium
	$(PY) -m tests.services -- $(PY) scripts/flower_screenshot.py

clean:
	rm -rf var .pytest_cache .hypothesis tests/node/node_modules
