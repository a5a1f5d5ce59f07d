# Two commands: `make run` builds a release from the embedded sample; `make test` runs the tests.
# Both create .venv and install the project first (pinned versions in pyproject.toml).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvqa-installed

.PHONY: install run test bench clean browser

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

# The quality report's test opens report.html in headless Chromium (the Debian package; a clean CI machine
# has none): installed with apt (sudo when not root) unless `chromium` or $$CHROMIUM is already there.
browser:
	@[ -n "$$CHROMIUM" ] || command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

# KVQA_REQUIRE_BROWSER: the browser test fails (never skips) when Chromium is missing.
test: $(STAMP) browser
	KVQA_REQUIRE_BROWSER=1 $(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/text_stages.py --quick
	$(BIN)/python benchmarks/publish.py --quick
	$(BIN)/python benchmarks/augment.py --quick

clean:
	rm -rf runs .pytest_cache
