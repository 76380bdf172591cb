# Two entry points for a fresh machine with Python 3.11 and make: `make demo` and `make test`.
# Both create .venv and install everything (torch==2.13.0 first, then the project) idempotently.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test clean-workspace

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/finetune demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-workspace:
	rm -rf workspace

# Local Prefect server, work pool, deployments, worker and the new-data watcher (see README "Dashboard").
include mk/server.mk
