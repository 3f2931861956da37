# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= config/supd.toml

.PHONY: run test lint bench clean venv

# Debian's python3 needs python3-venv for this; as root we install it when missing.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "python3 -m venv failed: installing python3-venv" >&2; \
	    apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); \
	  else echo "python3 -m venv failed: install python3-venv (Debian/Ubuntu)" >&2; exit 1; fi; }
	$(BIN)/python -m pip install --quiet --upgrade pip

# The stamp files reinstall only when pyproject.toml changes.
# The import name supd maps to the folder supervisor/ (package-dir), which setuptools
# can only install editable through an import hook, and it says so with an
# "Editable installation ... folders with the same name as your package may take
# precedence" notice on every install. No folder here is named supd, so the notice
# never applies: it is filtered out (that one message only; other warnings still show).
PIP_INSTALL := PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install --quiet

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(PIP_INSTALL) -e '.[test]'
	touch $@ $(VENV)/.installed

venv: $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/supd -c $(CONFIG)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check supervisor tests benchmarks
	$(BIN)/ruff format --check supervisor tests benchmarks
	$(BIN)/mypy supervisor

test: lint
	$(BIN)/python -m pytest

bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .bench-venv .pytest_cache .mypy_cache .ruff_cache logs run
