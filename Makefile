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

# The C spawner (supervisor/_spawn.c) is built by the install where a C compiler exists;
# as root on Debian we install one when missing (without it supd still works, slower).
CC_CHECK = command -v cc >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && { apt-get update -qq && apt-get install -y -qq gcc libc6-dev >/dev/null; } \
	  || echo "no C compiler: supd will use its pure-Python spawn method" >&2; }

# The stamp files reinstall only when pyproject.toml or the C spawner changes.
$(VENV)/.installed: pyproject.toml supervisor/_spawn.c | $(BIN)/python
	@$(CC_CHECK)
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml supervisor/_spawn.c | $(BIN)/python
	@$(CC_CHECK)
	$(BIN)/python -m pip install --quiet -e '.[test]'
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
