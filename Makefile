# One command each: `make demo` (install + demo), `make test` (install + tests), `make bench`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export MAX_JOBS ?= 2
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec

.PHONY: install build test test-slow demo bench bench-scaling cpp clean

install: $(VENV)/.deps-installed build

$(VENV)/.deps-installed: requirements.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@echo "relfast: installing the dependencies (torch with its CUDA libraries: a few GB from PyPI on a fresh machine)"
	$(PY) -m pip install --progress-bar off -r requirements.txt -c constraints.txt | { grep -E --line-buffered '^(Collecting|Successfully)' || true; }
	touch $@

# The first build registers the editable install (pip builds in a throw-away folder); later
# builds recompile in place, incrementally (ninja, objects kept under build/). The full log goes
# to build/; the terminal gets one line per compiled file (ninja's [done/total] counter). No '#'
# in PROGRESS: make would read it as a comment.
PROGRESS := sed -unE 's@^\s*(\[[0-9]+/[0-9]+\]) .*/(csrc/[^ ]+\.(cpp|cu)) .*@relfast: compiled \1 \2@p'
build: $(VENV)/.deps-installed $(VENV)/.relfast-registered
	$(PY) setup.py -q build_ext --inplace 2>&1 | tee build/build_ext.log | $(PROGRESS) \
		|| { tail -n 60 build/build_ext.log; echo "relfast: build failed, full log in build/build_ext.log"; exit 1; }
	grep -h -E "^\s*relfast: " build/build_ext.log | sed 's/^\s*//' | sort -u
	$(PY) -c "import relfast; print('relfast', relfast.__version__, '| CUDA kernels built:', relfast.ops.built_with_cuda())"

$(VENV)/.relfast-registered: setup.py pyproject.toml
	mkdir -p build
	@echo "relfast: first build of the kernels: 17 files, about 3 minutes on 2 cores with CUDA (the .cu files take the longest)"
	$(PY) -m pip install -v --no-build-isolation --no-deps -e . 2>&1 | tee build/pip-install.log | $(PROGRESS) \
		|| { tail -n 60 build/pip-install.log; echo "relfast: install failed, full log in build/pip-install.log"; exit 1; }
	touch $@

# Per-file progress lines and the 15 slowest cases at the end. The slow cases (pytest -m slow:
# 1,000 repeated explanations per model for the flat-memory check; the attnlrp export of every
# model) run apart: make test-slow.
test: install
	$(PY) -m pytest tests -m "not slow" --durations=15

test-slow: install
	$(PY) -m pytest tests -m slow --durations=15

demo: install
	$(PY) examples/demo_ops.py
	$(PY) examples/demo_explain_text.py
	$(PY) examples/demo_explain_images.py out
	$(PY) examples/demo_export.py out

# bench_scaling.py (N up to 4096, about 20 minutes on 2 cores) runs on its own: make bench-scaling
bench: install
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-columns=min,median,mean,rounds -q \
		--ignore=benchmarks/bench_scaling.py

bench-scaling: install
	$(PY) -m pytest benchmarks/bench_scaling.py --benchmark-only -k cpu -q -s

cpp: $(VENV)/.deps-installed
	cmake -S . -B build/cmake
	cmake --build build/cmake -j2

clean:
	rm -rf build relfast/*.so *.egg-info
