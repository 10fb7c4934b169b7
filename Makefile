# Set-up and everyday commands. Everything runs in .venv inside the checkout.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test lint bench clean

# (Re)install when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

bench: setup
	$(PY) Testing/benchmarks/bench_inference.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
