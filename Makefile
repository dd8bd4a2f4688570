# The two commands a newcomer needs (Python 3.11, no GPU, no internet but the package registries):
#   make demo   set up, then run the whole pipeline on the embedded toy world and print the report path
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CORES  ?= 2

.PHONY: setup demo test clean

setup: $(STAMP)

# torch first, pinned: on CPU machines 2.13.0 resolves to the CPU build, and the project's range
# (torch>=2.4,<2.14) then keeps it. An unpinned torch (or any torchvision) pulls the CUDA stack.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --cores $(CORES)

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

clean:
	rm -rf results logs report/report.html .snakemake
