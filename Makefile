# rnnlab — `make demo` and `make test` work on a fresh machine with only Python 3.10+.
# The virtual environment is .venv. Torch: if .venv has none, $(TORCH) is installed
# (torch==2.13.0 takes the CPU build on machines that ship it locally). To use your own torch
# (e.g. a CUDA build), install it into .venv first, or run `make test TORCH="torch==2.5.1"`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.rnnlab-installed

.PHONY: demo test test-fast bench readme install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,plot,hf,serve]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rnnlab demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

bench: $(STAMP)
	$(BIN)/rnnlab bench ops --quick

readme: $(STAMP)
	$(BIN)/python -c "from rnnlab.models.registry import update_readme; update_readme()"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis runs
