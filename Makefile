# damond: `make demo` shows it monitoring a real process; `make test` runs everything.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Debian packages the daemon, its build and its tests need.
APT_PACKAGES := dbus systemd libsystemd-dev pkg-config gcc python3-dev

.PHONY: all deps venv test lint demo bench clean

all: venv

deps:
	@scripts/ensure-apt $(APT_PACKAGES)

$(VENV)/.installed: pyproject.toml
	@$(MAKE) --no-print-directory deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

test: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy
	$(PY) -m pytest

demo: venv
	$(PY) -m damond.demo

bench: venv
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
