# Two commands on a fresh clone: `make demo` and `make test`.
# Each creates .venv from the pinned versions in constraints.txt when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# tests/conftest.py runs the tests on 8 simulated CPU devices (sharding code without accelerators).
PYTEST_ARGS ?=

# timm parity tests: timm needs torchvision, available here only as CUDA builds, so they run
# in their own environment (.venv-timm, ~7 GB) pinned by constraints-timm.txt.
TIMM_VENV := .venv-timm
TIMM_STAMP := $(TIMM_VENV)/.installed

.PHONY: demo test test-quick test-timm bench venv clean

RUNTIME_STAMP := $(VENV)/.installed-runtime

venv: $(STAMP)

# The demo needs only the package; the tests add the PyTorch parity references.
$(RUNTIME_STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e .
	touch $(RUNTIME_STAMP)

$(STAMP): $(RUNTIME_STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

$(TIMM_STAMP): pyproject.toml constraints-timm.txt
	test -x $(TIMM_VENV)/bin/python || $(PYTHON) -m venv $(TIMM_VENV)
	$(TIMM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TIMM_VENV)/bin/python -m pip install --quiet -c constraints-timm.txt -e ".[test,timm]"
	touch $(TIMM_STAMP)

demo: $(RUNTIME_STAMP)
	$(PY) main.py

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist worksteal -rs --durations=15 $(PYTEST_ARGS)

test-quick: $(STAMP)
	$(PY) -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

test-timm: $(TIMM_STAMP)
	HF_HUB_OFFLINE=1 $(TIMM_VENV)/bin/python -m pytest -n 2 -m timm -rs $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/vit_step.py
	$(PY) bench/input_pipeline.py
	$(PY) bench/mae_step.py --variant S/16 --batch 8 --decoders 256x1,128x1
	$(PY) bench/decode.py

clean:
	rm -rf $(VENV) $(TIMM_VENV) .pytest_cache
