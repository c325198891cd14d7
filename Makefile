# Every target installs what it needs first, so a fresh clone works with
# `make test` or `make serve` alone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CODE := $(wildcard src tests bench ci)

.PHONY: install test check format bench serve clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest

check: install
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)
	$(BIN)/mypy

format: install
	$(BIN)/ruff format $(CODE)
	$(BIN)/ruff check --fix $(CODE)

bench: install
	$(BIN)/python -m bench --json bench/results/latest.json

# Run the service on an embedded store in ./_kitci, testing this very
# repository with the pipeline in ci/self.py.
serve: install
	$(BIN)/kitci serve --store _kitci/store --pipeline ci/self.py \
	    --repo kitci/kitci=. --web-ui http://127.0.0.1:8087

clean:
	rm -rf $(VENV) _kitci .mypy_cache .pytest_cache .ruff_cache
