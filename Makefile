# The README's two commands: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/demo

.PHONY: demo test bench clean

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dask]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m pipeline.demo --workdir=$(WORKDIR)

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 --dist loadfile --durations=15 tests

clean:
	rm -rf $(VENV) workdir *.egg-info
