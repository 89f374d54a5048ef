# One virtual environment for everything; `make test` and `make demo` create it on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
YAIE   := $(VENV)/bin/yaie
STAMP  := $(VENV)/.installed

.PHONY: setup chromium test test-fast demo bench-core build-kernels lint

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first (on disk on our machines), so nothing pulls a CUDA wheel.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# The browser tests drive Debian's chromium headless (Playwright never downloads a browser).
chromium:
	@command -v chromium >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

test: setup chromium
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q tests/unit

demo: setup
	$(YAIE) generate "What is the capital of France?"

bench-core: setup
	$(YAIE) bench core

# Compile the numba kernels for this machine's GPU into numba's cache (no GPU: says so, exits 0).
build-kernels: setup
	$(PY) -m yaie.kernels.build
