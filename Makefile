# Two commands on a fresh clone: `make demo` and `make test`.
# Each creates .venv from the pinned versions in constraints.txt when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# tests/conftest.py runs the tests on 8 simulated CPU devices (sharding code without accelerators).
PYTEST_ARGS ?=

.PHONY: demo test test-quick bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) main.py

test: $(STAMP)
	$(PY) -m pytest -n 2 --durations=15 $(PYTEST_ARGS)

test-quick: $(STAMP)
	$(PY) -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/vit_step.py

clean:
	rm -rf $(VENV) .pytest_cache
