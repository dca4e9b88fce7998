# Two entry points (see README): `make serve` and `make test`. Each creates .venv as needed.
PYTHON ?= python3
# CPU build on machines without a GPU; GPU users: make TORCH="torch==2.13.0 --index-url <CUDA index>"
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: serve test lint format install clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.base: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	$(BIN)/python -m workers.expert_kernel  # build the fused expert kernel once (cached)
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.base

serve: $(VENV)/.base
	$(BIN)/expertmesh serve $(ARGS)

test: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.test
	$(BIN)/ruff check .

format: $(VENV)/.test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
