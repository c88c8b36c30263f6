# `make demo` runs the main job, `make test` the test suite. Both create .venv when it is missing and install
# the pinned stack CPU-only (constraints.txt pins torch; DS_BUILD_OPS=0 keeps DeepSpeed pure-Python).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DS_BUILD_OPS := 0
export DS_ACCELERATOR ?= cpu
export MLFLOW_DISABLE_TELEMETRY := true
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export OMP_NUM_THREADS ?= 1

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): setup.cfg constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,hf]'
	touch $(STAMP)

demo: venv
	$(PY) -m launch.demo

test: venv
	$(PY) -m pytest tests

bench: venv
	$(PY) bench/model_step.py

clean:
	rm -rf $(VENV) .cache runs
