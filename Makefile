# The two commands: `make demo` (the whole loop) and `make test` (set-up + the full suite).
.PHONY: setup test test-fast demo lint protos clean

VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

setup:
	bash scripts/setup.sh

# The 20 slowest tests are listed at the end, so a test that grows slow shows in CI's output.
test: setup
	$(PY) -m pytest -q --durations=20 $(PYTEST_ARGS)

# Skips tests that start vLLM or convert the default model.
test-fast:
	$(PY) -m pytest -q -m "not vllm and not slow" $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/rlhf demo

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/buf lint

protos:
	$(PY) scripts/gen_protos.py
	$(VENV)/bin/buf lint

clean:
	rm -rf $(VENV) .pytest_cache
