VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test test-fast test-gpu bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -c constraints.txt torch
	$(BIN)/pip install -c constraints.txt -e '.[test]'
	touch $(STAMP)

serve: install
	$(BIN)/embedding-cluster serve

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

# the library and the unit tests: no Ray cluster started (under 2 minutes)
test-fast: install
	$(BIN)/pytest -m "not cluster" $(PYTEST_ARGS)

# the GPU tier, on a machine with CUDA (skipped elsewhere); see README, GPUs
test-gpu: install
	$(BIN)/pytest -m gpu tests/gpu $(PYTEST_ARGS)

# every contender of the bench, ONNX Runtime included (about 12 minutes on 2 cores)
bench: install
	$(BIN)/pip install -c constraints.txt -e '.[test,bench]'
	$(BIN)/embedding-cluster bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV)
