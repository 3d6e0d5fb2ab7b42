# make test | make quickstart | make lint — each creates .venv when missing.
PYTHON ?= python3
# pytest-xdist workers of `make test`, each running whole test modules (their shared fixtures are built once)
# in the order tests/conftest.py gives (longest first; xdist would otherwise sort by number of tests). Three
# on a 2-core machine: while one worker's test waits (a SLURM job queued, a storage outage timed out, torchrun
# starting its ranks), the other two keep both cores busy.
TEST_WORKERS ?= 3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# DeepSpeed JIT-builds its CPU ops on first use; keep them with this environment (another venv's build flags
# would otherwise make each environment rebuild the shared cache in turn).
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
# Second environment: the inference-side tests under transformers 5.x (requirements-tf5.txt says why). It
# holds only transformers 5 and its own dependencies; torch, Pillow and pytest come from $(VENV) through a
# .pth appended after its own site-packages (same pins, no second 5 GB torch install).
TF5_VENV ?= .venv-tf5
TF5_PY := $(TF5_VENV)/bin/python
TF5_STAMP := $(TF5_VENV)/.installed
# What transformers touches: tokenizer set-up, model build/export/reload, image processor, Phi-3 with the SDPA
# mask and the FlexAttention BlockMask, cached generation, the train-step benchmark (30-60 s on 2 cores; the other
# modes and layouts of the same code paths run in the main suite).
TF5_TESTS := tests/test_model.py 'tests/test_attention.py::test_block_mask_dense_and_eager_paths_give_the_same_logits[mma]' \
	'tests/test_generate.py::test_cached_greedy_equals_teacher_forced_argmax[mma-sdpa]' tests/test_generate.py::test_text_api_and_cli_answer_from_an_export_folder \
	tests/test_generate.py::test_generation_stops_at_stop_tokens tests/test_bench.py::test_train_step_bench_tiny
TF5_SKIP := not answer_tokens_never_leak_backwards and not packed_documents_equal_documents_alone

.PHONY: test test-tf5 quickstart lint clean-venv browser

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,eval,demo,qlora]'
	# DeepSpeed's CPU communication op, built once here rather than inside the first test's time limit
	DS_ACCELERATOR=cpu $(PY) -c 'from deepspeed.comm.torch import build_shm_op; build_shm_op()'
	touch $(STAMP)

$(TF5_STAMP): requirements-tf5.txt $(STAMP)
	test -x $(TF5_PY) || $(PYTHON) -m venv $(TF5_VENV)
	rm -f $$($(TF5_PY) -c 'import site; print(site.getsitepackages()[0])')/main-venv.pth
	$(TF5_PY) -m pip install -q --no-compile -r requirements-tf5.txt
	$(PY) -c 'import site; print(site.getsitepackages()[0])' \
		> $$($(TF5_PY) -c 'import site; print(site.getsitepackages()[0])')/main-venv.pth
	touch $(TF5_STAMP)

# Headless Chromium and its WebDriver from Debian's packages for the demo page's browser test
# (tests/test_demo.py), installed when missing and possible (root and apt-get, as for SLURM); elsewhere that
# test is skipped with the reason. Nothing downloads a browser.
BROWSER_PACKAGES := chromium chromium-driver
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing $(BROWSER_PACKAGES) (Debian packages) for tests/test_demo.py"; \
		{ DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $(BROWSER_PACKAGES) >/dev/null; } \
		|| echo "could not install $(BROWSER_PACKAGES): the demo's browser test will be skipped"; \
	else echo "no chromium/chromedriver, and installing them needs root and apt-get: the demo's browser test" \
		"will be skipped (sudo apt-get install $(BROWSER_PACKAGES))"; fi

# The suite runs with its own temporary folder, removed when it passes (kept for a look when it fails):
# mosaicml-streaming leaves a lock file per dataset in the temporary folder and scans them all each time it
# registers a dataset (~0.1 s per dataset at 3,000 files), so a shared /tmp would slow every later run.
# One torch thread per process: the two workers (and the training ranks they start) fill the cores, where
# torch's default (a thread per core in every process) would have their threads wait for each other.
test: $(STAMP) browser
	tmp=$$(mktemp -d -t aki-tests-XXXXXX) && TMPDIR=$$tmp DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(PY) -m pytest -q \
		-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS) && rm -rf $$tmp
	$(MAKE) test-tf5

test-tf5: $(TF5_STAMP)
	DS_ACCELERATOR=cpu $(TF5_PY) -m pytest -q -p no:cacheprovider $(TF5_TESTS) -k '$(TF5_SKIP)'

quickstart: $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -m pipeline.quickstart $(QUICKSTART_ARGS)

lint: $(STAMP)
	bash -n slurm/*.sbatch
	$(VENV)/bin/shellcheck slurm/*.sbatch slurm/*.sh bench/gpu_check.sh

clean-venv:
	rm -rf $(VENV) $(TF5_VENV)
