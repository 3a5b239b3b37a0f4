# Two entry points (README): `make demo` and `make test`. Both create .venv/ on first use.
# torch==2.13.0 is installed first so that this machine takes its CPU wheel; users with CUDA
# install their own torch and the package's `torch>=2.2` range accepts it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint slow clean docs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pima-pyro demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q

slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

$(VENV)/.docs-installed: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	touch $(VENV)/.docs-installed

# the site in docs/_build/html (notebooks executed in quick mode), warnings as errors
docs: $(VENV)/.docs-installed
	$(BIN)/python -m sphinx -E -W --keep-going -q -b html docs docs/_build/html

lint: $(STAMP)
	$(BIN)/ruff check pima_pyro tests benchmarks

clean:
	rm -rf $(VENV) demo_out docs/_build
