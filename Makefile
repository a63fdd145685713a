# The two entry points of the README: `make serve` and `make test` (each sets itself up first).
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: setup serve test test-slow

setup:
	bash scripts/setup.sh

serve: setup
	$(VENV)/bin/talora-serve

test: setup
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

test-slow: setup
	$(VENV)/bin/python -m pytest -q -m slow $(PYTEST_ARGS)
