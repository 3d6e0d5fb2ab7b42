# make test | make quickstart | make lint — each creates .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test quickstart lint clean-venv

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -m pytest -q $(PYTEST_ARGS)

quickstart: $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -m pipeline.quickstart $(QUICKSTART_ARGS)

lint: $(STAMP)
	bash -n slurm/*.sbatch
	$(VENV)/bin/shellcheck slurm/*.sbatch slurm/*.sh bench/gpu_check.sh

clean-venv:
	rm -rf $(VENV)
