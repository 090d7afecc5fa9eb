# The two commands a newcomer needs: `make demo` and `make test`. Each sets up what it needs first.
# `make test-fast` is the inner loop: no Azurite, no child processes (tests/conftest.py decides what is integration).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast lint typecheck bench demo clean

$(STAMP): pyproject.toml constraints.txt package.json package-lock.json
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	npm ci --no-audit --no-fund --silent
	touch $(STAMP)

setup: $(STAMP)

# Two workers, a file each at a time (session fixtures such as the wheel build stay one per worker): most integration
# tests wait on sleeps, latencies and child processes, so two overlap well on 2 cores. TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2

test: lint typecheck
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: setup
	$(BIN)/pytest -q -m "not integration"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

bench: setup
	$(BIN)/python bench/token_cache.py
	$(BIN)/python bench/sync.py
	$(BIN)/python bench/delta_round.py
	$(BIN)/python bench/fleet.py

demo: setup
	$(BIN)/python -m tests.demo

clean:
	rm -rf $(VENV) node_modules .pytest_cache .ruff_cache .mypy_cache *.egg-info
