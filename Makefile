# The two commands a newcomer needs (Python 3.11, no GPU, no internet but the package registries):
#   make demo   set up, then run the whole pipeline on the embedded toy world and print the report path
#   make test   set up, then run the test suite (installs headless Chromium for the browser tests if missing)
# Maintainers:
#   make lock          regenerate requirements/lock.txt and environment.yml from pyproject.toml (uv, PyPI)
#   make check-latest  try the newest versions pyproject.toml allows (no lock) on the adapter and end-to-end tests
#   make gpu-wheels    wheels of the locked transformers and its dependencies for the offline GPU machine (.whl/)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CORES  ?= 2
UV_VERSION := 0.13.9

.PHONY: setup demo test lock check-latest clean

setup: $(STAMP)

# A fresh venv whenever the lock changes: nothing installed by hand survives into a run.
$(STAMP): pyproject.toml requirements/lock.txt requirements/torch.txt tools/install.sh
	$(PYTHON) -m venv --clear $(VENV)
	tools/install.sh $(BIN)/python
	touch $(STAMP)

# `ficoco warm`: each local job forks an interpreter that has imported torch & co. once (docs/pipeline.md)
demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m ficoco.cli warm -- $(BIN)/snakemake --cores $(CORES)

test: $(STAMP)
	tools/ensure-chromium.sh
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n 2 --dist loadfile

lock:
	$(PYTHON) -m venv --clear .venv-tools
	.venv-tools/bin/pip install -q uv==$(UV_VERSION)
	PATH="$(CURDIR)/.venv-tools/bin:$$PATH" .venv-tools/bin/python tools/lock.py

check-latest:
	tools/check-latest.sh $(PYTHON)

# tools/gpu-bench.sh installs them there; docs/bench.md, "GPU run (H200)"
.PHONY: gpu-wheels
gpu-wheels: $(STAMP)
	$(BIN)/python tools/gpu_wheels.py

clean:
	rm -rf results logs report/report.html .snakemake
