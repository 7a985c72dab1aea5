PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Triton kernels run under the interpreter on machines without an NVIDIA GPU (so CI tests them on CPU).
TRITON_INTERPRET ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 0 || echo 1)

.PHONY: install demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned and installed first so that pip never resolves a CUDA build on CPU machines.
$(STAMP): $(BIN)/python setup.py
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,bench]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python example.py

test: $(STAMP)
	TRITON_INTERPRET=$(TRITON_INTERPRET) $(BIN)/python -m pytest -q tests

bench: $(STAMP)
	bash bench/test_speed.sh

clean:
	rm -rf $(VENV) *.egg-info
