# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= config/supd.toml

.PHONY: run test test-systemd systemd-nspawn lint bench clean venv

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

# The import name supd maps to the folder supervisor/ (package-dir), which setuptools
# can only install editable through an import hook, and it says so with an
# "Editable installation ... folders with the same name as your package may take
# precedence" notice on every install. No folder here is named supd, so the notice
# never applies: it is filtered out (that one message only; other warnings still show).
# setuptools also calls its pyproject ext-modules table (the C spawner) experimental.
PIP_INSTALL := PYTHONWARNINGS="ignore:Editable installation,ignore:\`[tool.setuptools.ext-modules]\`" \
	$(BIN)/python -m pip install --quiet

# The stamp files reinstall only when pyproject.toml or the C spawner changes.
$(VENV)/.installed: pyproject.toml supervisor/_spawn.c | $(BIN)/python
	@$(CC_CHECK)
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml supervisor/_spawn.c | $(BIN)/python
	@$(CC_CHECK)
	$(PIP_INSTALL) -e '.[test]'
	touch $@ $(VENV)/.installed

venv: $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/supd -c $(CONFIG)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check supervisor tests benchmarks
	$(BIN)/ruff format --check supervisor tests benchmarks
	$(BIN)/mypy supervisor

test: lint systemd-nspawn
	$(BIN)/python -m pytest

# The systemd tier alone (tests/systemd: a real systemd booted with systemd-nspawn);
# here a machine that cannot run it fails instead of skipping.
test-systemd: $(VENV)/.installed-test systemd-nspawn
	SUPD_REQUIRE_SYSTEMD=1 $(BIN)/python -m pytest tests/systemd

# The systemd tier needs systemd-nspawn: as root with apt-get, install it when missing
# (a no-op when present). Where that fails the tier is skipped, with the reason.
systemd-nspawn:
	@command -v systemd-nspawn >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing systemd-container (systemd-nspawn) for tests/systemd" >&2; \
	    { apt-get update -qq && apt-get install -y -qq systemd-container >/dev/null; } \
	      || echo "could not install systemd-container: tests/systemd will be skipped" >&2; \
	  else echo "no systemd-nspawn (apt-get install systemd-container): tests/systemd will be skipped" >&2; \
	  fi; }

bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .bench-venv .pytest_cache .mypy_cache .ruff_cache logs run build supervisor/*.so
