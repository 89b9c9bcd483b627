# Quick start targets: each sets up (idempotent) and then runs.
PYTHON ?= python3

.PHONY: setup demo test test-slow lint docs

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

demo: setup
	$(PYTHON) examples/demo.py

test: setup
	$(PYTHON) -m pytest

test-slow: setup
	$(PYTHON) -m pytest -m slow

lint: setup
	$(PYTHON) -m ruff check .

docs: setup
	$(PYTHON) -m pip install --quiet -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict
