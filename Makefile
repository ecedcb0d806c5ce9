# The same commands locally and in CI (.ci/run calls `make test`).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test lint fix demo bench clean

# A virtual environment with the training and dev extras. torch is pinned first so pip takes the
# local CPU wheel instead of pulling a multi-GB CUDA build.
$(BIN)/gptkit: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[train,dev]'
	touch $@

setup: $(BIN)/gptkit

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fix: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/pytest -q

# Train on the bundled corpus, export model.onnx, generate: the whole pipeline.
demo: setup
	$(BIN)/gptkit

bench: setup
	$(BIN)/python benchmarks/decode.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
