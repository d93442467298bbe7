# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install everything, run the main job (DMD2 one-step DAR student on the embedded default)
#   make test   - create .venv, install everything, check the import contracts, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DMD := $(VENV)/bin/dmd-dar
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(DMD) distill
	$(DMD) eval suite=eval/suites/embedded.yaml

test: $(STAMP)
	$(VENV)/bin/lint-imports  # the import-linter contracts in pyproject.toml (layers, forbidden imports)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check dmd_dar tests eval

clean:
	rm -rf $(VENV) runs
