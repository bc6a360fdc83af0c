# Two commands do all set-up: `make serve` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: fleet serve test test-quick lint typecheck pytest bench bench-quick worker clean chromium peers-venv soak

# The serving frameworks the benchmark compares against (LitServe, Ray Serve, mosec) live in their own venv,
# never in the product's: same torch pin, the engine code comes from the checkout.
PEERS_VENV  := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed

$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# torch + torchvision are pinned in pyproject (2.14.1 / 0.29.1: the builds that lie on this disk)
	# the light client first: the server depends on it (the remote CLI), and it is not on any index
	$(PY) -m pip install -q -e ./client
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

$(PEERS_STAMP): bench/peers/requirements.txt
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install -q -r bench/peers/requirements.txt
	touch $(PEERS_STAMP)

peers-venv: $(PEERS_STAMP)

serve: $(STAMP)
	$(VENV)/bin/actprompt serve

# PostgreSQL, Redis, HAProxy (balancer on :8080, stats on :8404), 3 API replicas and 2 workers as separate
# processes on this machine, in the foreground (Ctrl-C stops them); see docs/DEPLOY.md
fleet: $(STAMP)
	$(PY) -m deploy.fleet

worker: $(STAMP)
	$(VENV)/bin/actprompt worker

lint: $(STAMP)
	$(VENV)/bin/ruff check service workers client tests bench migrations deploy
	$(VENV)/bin/ruff format --check service workers client tests bench migrations deploy

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# The console's browser tests drive Debian's chromium through Playwright (no browser download): install it
# when missing and we may (root, as in CI); otherwise the test names what is missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || test -x "$${ACTPROMPT_CHROMIUM:-/usr/bin/chromium}" || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
	  echo "chromium is missing (apt-get install -y chromium): the console tests will fail"

pytest: $(STAMP) chromium
	$(PY) -m pytest -q --durations=15

test: lint typecheck pytest

# Fast local loop: no PostgreSQL, no Redis, no slow real-data runs. `make test` (what CI runs) is the whole suite.
test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not postgres and not redis"

# BUDGET=full: the full budget of bench/GOALS.md (CPU-hours); default: ~110 min on a quiet 2-core CPU in all
# (~65 min of accuracy, the rest training cost, serving, HTTP, the serving frameworks side by side and the fleet)
bench: $(STAMP) $(PEERS_STAMP)
	$(PY) -m bench.run_all $(if $(BUDGET),--budget $(BUDGET))

# 30 min at 70 % of saturation, 10,000 prompts through a host cache of a quarter of them (outside `make bench`)
soak: $(STAMP)
	$(PY) -m bench.soak $(if $(MINUTES),--minutes $(MINUTES))

bench-quick: $(STAMP) $(PEERS_STAMP)
	$(PY) -m bench.run_all --quick

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
