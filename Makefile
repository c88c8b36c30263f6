# `make demo` runs the main job, `make test` the test suite. Both create .venv when it is missing and install
# the pinned stack CPU-only (constraints.txt pins torch; DS_BUILD_OPS=0 keeps DeepSpeed pure-Python).
# `make test` also needs Java, for the METEOR 1.5 jar of the QG metrics: `make java` installs Debian's
# default-jre-headless where `java` is missing (apt-get as root, else through sudo), and does nothing otherwise.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DS_BUILD_OPS := 0
export DS_ACCELERATOR ?= cpu
export MLFLOW_DISABLE_TELEMETRY := true
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export OMP_NUM_THREADS ?= 1

APT_GET := $(if $(filter 0,$(shell id -u)),,sudo )apt-get

.PHONY: venv java demo test bench clean

venv: $(STAMP)

$(STAMP): setup.cfg constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,hf,meteor]'
	touch $(STAMP)

java:
	@command -v java >/dev/null 2>&1 || { \
	  command -v apt-get >/dev/null 2>&1 || { echo "METEOR 1.5 needs Java: install a Java runtime (no apt-get here)"; exit 1; }; \
	  echo "java not found: installing default-jre-headless (METEOR 1.5)"; \
	  $(APT_GET) update -qq && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq --no-install-recommends default-jre-headless; }
	@java -version 2>&1 | head -1

demo: venv
	$(PY) -m launch.demo

test: venv java
	$(PY) -m pytest tests

bench: venv
	$(PY) bench/model_step.py

clean:
	rm -rf $(VENV) .cache runs
