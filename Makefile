# The README's two commands: `make demo` and `make test`. Each sets up .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel by default; a GPU machine overrides it (see README, "GPU install").
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.dynomp-installed
PYTEST_ARGS ?=
CORES ?= 2
REPORT ?= results/default/report.html

.PHONY: install demo test bench clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

# The default study (configs/default.yaml) through the Snakemake workflow, then its HTML report.
demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/snakemake --cores $(CORES) --configfile configs/default.yaml
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/snakemake --cores $(CORES) --configfile configs/default.yaml --report $(REPORT)
	@echo "report: $(abspath $(REPORT))"

test: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) benchmarks/precision.py

clean-venv:
	rm -rf $(VENV)
