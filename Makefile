# Two commands do all set-up: `make serve` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: serve test test-quick lint typecheck pytest bench bench-quick worker clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# torch + torchvision are pinned in pyproject (2.14.1 / 0.29.1: the builds that lie on this disk)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/actprompt serve

worker: $(STAMP)
	$(VENV)/bin/actprompt worker

lint: $(STAMP)
	$(VENV)/bin/ruff check service workers tests bench migrations
	$(VENV)/bin/ruff format --check service workers tests bench migrations

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(PY) -m pytest -q --durations=15

test: lint typecheck pytest

# Fast local loop: no PostgreSQL, no Redis, no slow real-data runs. `make test` (what CI runs) is the whole suite.
test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not postgres and not redis"

bench: $(STAMP)
	$(PY) -m bench.run_all

bench-quick: $(STAMP)
	$(PY) -m bench.run_all --quick

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
