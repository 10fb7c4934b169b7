# Set-up and everyday commands. Everything runs in .venv inside the checkout.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench clean

# (Re)install when pyproject.toml changes. The demo needs only the light core (ONNX Runtime, no torch);
# the tests need the full development set (training, Slicer's MRML, linters).
$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.core
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# The main job: segment the bundled sample with the bundled demo model (Dice, volume, seconds, overlay).
demo: $(VENV)/.core
	$(PY) -m samless demo --out output/demo --overwrite

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

bench: setup
	$(PY) Testing/benchmarks/bench_inference.py
	$(PY) Testing/benchmarks/bench_training.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
