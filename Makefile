# Two commands: `make run` builds a release from the embedded sample; `make test` runs the tests.
# Both create .venv and install the project first (pinned versions in pyproject.toml).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvqa-installed

.PHONY: install run test bench clean

# The `onnx` extra (dedup.backend onnx) goes in too, so its tests run.
# torch goes in first, pinned: sentence-transformers needs it, and without it pip would pull a CUDA
# build of several GB. 2.13.0 is the CPU build this machine kind serves.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,onnx]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/kvqa build

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/text_stages.py --quick
	$(BIN)/python benchmarks/publish.py --quick
	$(BIN)/python benchmarks/augment.py --quick

clean:
	rm -rf runs .pytest_cache
