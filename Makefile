# Quick start targets: each sets up (idempotent) and then runs.
PYTHON ?= python3

.PHONY: setup demo test docs

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

demo: setup
	$(PYTHON) examples/demo.py

test: setup
	$(PYTHON) -m pytest
