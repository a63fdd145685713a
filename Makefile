# The two entry points of the README: `make serve` and `make test` (each sets itself up first).
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: setup serve test test-slow lint

setup:
	bash scripts/setup.sh

serve: setup
	$(VENV)/bin/talora-serve

test: setup
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

test-slow: setup
	$(VENV)/bin/python -m pytest -q -m slow $(PYTEST_ARGS)

# ruff and mypy alone (make test runs them too, in tests/test_tooling.py)
lint: setup
	$(VENV)/bin/python -m pytest -q tests/test_tooling.py
