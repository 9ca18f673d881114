# Set-up and entry points. `make run` and `make test` work on a fresh machine:
# they create .venv, install the project and its data, and go.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export JAX_PLATFORMS ?= cpu

.PHONY: venv test test-fast clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -n 2 -q

test-fast: venv
	$(PY) -m pytest -n 2 -q -m 'not slow'

clean:
	rm -rf $(VENV) build *.egg-info
