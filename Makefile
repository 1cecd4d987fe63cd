# Two commands for a newcomer: `make test` and `make demo`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-deps lint demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The Debian packages the tests need (Chromium for the page), before anything else.
test-deps:
	scripts/test-deps.sh

# Two workers, each taking whole files (--dist loadfile), so that a module's shared
# servers (Redis, Mosquitto, nginx, Chromium) stay with its tests: about half the
# wall time of one worker, most of which is waiting on sockets and child processes.
test: test-deps lint
	$(BIN)/pytest -n 2 --dist loadfile

# Its own data dir: the demo's simulated devices never mix with a real gateway's
# ./data, and `make clean` forgets them.
DEMO_DATA := ./data-demo

demo: $(STAMP)
	$(BIN)/iot-gateway serve --demo 6 --data-dir $(DEMO_DATA)

bench: $(STAMP)
	$(BIN)/python benchmarks/codec.py
	$(BIN)/python -m benchmarks.suite

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache $(DEMO_DATA)
