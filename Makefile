# Two entry points (see README): `make serve` and `make test`. Each creates .venv as needed.
PYTHON ?= python3
# CPU build on machines without a GPU; GPU users: make TORCH="torch==2.13.0 --index-url <CUDA index>"
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: serve test lint format install clean-venv

$(BIN)/python:
	@echo "expertmesh: creating $(VENV) with $(PYTHON)"
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip

$(VENV)/.base: pyproject.toml | $(BIN)/python
	@echo "expertmesh: installing $(TORCH) and the dependencies into $(VENV) (first time: a few minutes)"
	@$(BIN)/pip install -q $(TORCH)
	@$(BIN)/pip install -q -e .
	@echo "expertmesh: building the fused CPU kernels (experts, dense decode ops; once, cached)"
	@$(BIN)/python -m workers.native
	@touch $@

$(VENV)/.test: $(VENV)/.base
	@echo "expertmesh: installing the test dependencies into $(VENV)"
	@$(BIN)/pip install -q -e ".[test]"
	@touch $@

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
