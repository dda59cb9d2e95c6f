# Setup is part of every target: a fresh clone needs only `make run` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install run test lint ui clean-workspace

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned torch requirement would pull several GB of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: install  ## the whole pipeline on the built-in corpus (tiny preset)
	$(BIN)/lmpipe run --preset tiny

test: install  ## the test suite (hermetic: temporary workspaces, Prefect home and MLflow store)
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check lmpipe tasks flows tests benchmarks

ui: install  ## the MLflow UI of the default workspace
	$(BIN)/lmpipe ui
