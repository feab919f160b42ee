# Two commands on a fresh machine: `make demo` and `make test` (both set up .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench browser clean

setup: $(STAMP)

# torch first, pinned: the local CPU wheel; installing it later through a range would pull a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[app,dev,onnx,openvino]"
	touch $(STAMP)

demo: setup
	$(PY) -m neuromap demo -o demo_out

# Headless Chromium for the browser test of the web app (Debian package; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

test: setup browser
	$(PY) -m ruff check src tests benchmarks scripts
	$(PY) -m pytest -q

bench: setup browser
	$(PY) benchmarks/segment_speed.py
	$(PY) benchmarks/engines.py
	$(PY) benchmarks/lgg_load.py
	$(PY) benchmarks/app_load.py
	$(PY) benchmarks/skip_slices.py
	$(PY) benchmarks/raw_vs_prepared.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
