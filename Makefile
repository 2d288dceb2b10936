# make test   build .venv (if missing), install torch + deps + sam_fast (editable, with the
#             compiled extension), run the tests
# make demo   same install, then the end-to-end demo (tiny random SAM on a CPU)
# make bench  same install, then the pytest-benchmark suite, one process per benchmark file, merged
#             into bench/results/<device>-<date>.json (bench/run.py; UPDATE_DOCS=1 also rewrites
#             docs/performance.md's Speed table)
# make clean  remove build outputs and the install stamp (keeps .venv)
# make gpu-check  on a CUDA machine without network: build against its own torch, GPU benchmarks,
#             model checks, CUDA tests, under a deadline (bench/gpu_check.py; report rewritten after
#             each item in $SAM_FAST_GPU_CHECK_OUT, else $OUT, else bench/results/). Uses $(PYTHON)
#             as is (no venv, no installs); its --dry-run CPU mode runs inside `make test`
#             (tests/test_gpu_check.py). On a lent machine: timeout -k 10 540 make gpu-check
#
# TORCH_SPEC is passed to pip as is. The default is the CPU build found on the dev/CI machines;
# for a CUDA torch, e.g.:
#   make test TORCH_SPEC="torch==2.11.0" TRITON_SPEC=triton==3.6.0   (plus your CUDA wheel index, if any)
# SAM_FAST_BUILD_EXT=0 in the environment gives a pure-Python install (no compiler needed).

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TRITON_SPEC ?= triton==3.7.1
DEPS        ?= transformers==5.25.0 safetensors tokenizers numpy pillow tqdm pyyaml pycocoevalcap rouge \
               matplotlib pytest pytest-benchmark diffusers==0.42.1 accelerate==1.15.0 tensorboard==2.21.0 \
               ninja "setuptools>=77" wheel build

PY        := $(VENV)/bin/python
PIP       := $(PY) -m pip --disable-pip-version-check
STAMP     := $(VENV)/.stamp-sam-fast
SPEC_FILE := $(VENV)/.install-spec
SOURCES   := setup.py pyproject.toml $(wildcard csrc/*)

.PHONY: install test bench bench-compare demo clean gpu-check FORCE

install: $(STAMP)

# The benchmarks run once each as smoke tests (--benchmark-disable); `make bench` times them.
test: $(STAMP)
	$(PY) -m pytest -q tests bench --benchmark-disable

# Results: bench/results/<device>-<date>.json (+ .md table, PNG plots). docs/performance.md's "Speed"
# table is rewritten only on request: make bench UPDATE_DOCS=1 (UPDATE_README=1, the former name, too)
UPDATE_README ?=
UPDATE_DOCS ?= $(UPDATE_README)
bench: $(STAMP)
	@mkdir -p bench/results
	@name=$$($(PY) -c "import sys; sys.path.insert(0, 'bench'); from benchutil import device_name; \
		print(device_name().replace(' ', '_'))")-$$(date +%Y-%m-%d); \
	$(PY) bench/run.py --json bench/results/$$name.json && \
	$(PY) bench/report.py bench/results/$$name.json $(if $(UPDATE_DOCS),--doc docs/performance.md) && \
	echo "results: bench/results/$$name.json (+ .md, PNG plots)$(if $(UPDATE_DOCS),; docs/performance.md Speed table updated,; docs/performance.md untouched (UPDATE_DOCS=1 updates it))"

# Fails when a tracked speedup_* ratio of NEW dropped by more than 10% against BASELINE.
BASELINE ?= bench/baseline.json
# NEW: the newest `make bench` result (by time; gpu_check-*.json are another kind of file)
NEW      ?= $(firstword $(shell ls -t bench/results/*.json 2>/dev/null | grep -v '/gpu_check-'))
bench-compare:
	$(PY) bench/compare.py $(NEW) $(BASELINE)

# The machine's own interpreter and torch: nothing is installed from a network.
GPU_CHECK_ARGS ?=
gpu-check:
	$(PYTHON) bench/gpu_check.py $(GPU_CHECK_ARGS)

demo: $(STAMP)
	$(PY) -m sam_fast.cli demo

$(PY):
	$(PYTHON) -m venv $(VENV)

# Rewritten only when the requested versions change, so that a new TORCH_SPEC reinstalls.
$(SPEC_FILE): FORCE | $(PY)
	@echo '$(TORCH_SPEC) $(TRITON_SPEC) $(DEPS)' | cmp -s - $@ || echo '$(TORCH_SPEC) $(TRITON_SPEC) $(DEPS)' > $@

# torch first and alone: the build of the extension compiles against it (hence
# --no-build-isolation, which keeps pip from building against another torch).
$(STAMP): $(SPEC_FILE) $(SOURCES)
	$(PIP) install --quiet $(TORCH_SPEC)
	$(PIP) install --quiet $(TRITON_SPEC) $(DEPS)
	$(PIP) install --quiet --no-build-isolation -e .
	@$(PY) -c "from sam_fast import _ext; i = _ext.info(); print('sam_fast._C:', 'loaded' if _ext.load() else 'not loaded', i)"
	@touch $@

clean:
	rm -rf build dist *.egg-info sam_fast/_C*.so $(STAMP) .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
