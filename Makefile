# Set-up and entry points. `make run` and `make test` work on a fresh machine:
# they create .venv, install the project and its data, and go. Another
# interpreter in another venv: `make test PYTHON=python3.12 VENV=.venv312`
# (Python 3.11 resolves jax 0.10.2, Python 3.12/3.13 jax 0.12.x).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# `python3.12` may be a pyenv shim for a version pyenv has not enabled: then
# the interpreter pyenv installed under that name.
PYTHON_EXE := $(or $(shell $(PYTHON) -c 'import sys; print(sys.executable)' 2>/dev/null),$(lastword $(wildcard $(HOME)/.pyenv/versions/$(patsubst python%,%,$(notdir $(PYTHON))).*/bin/$(notdir $(PYTHON)))),$(PYTHON))

# JAX takes the accelerator where there is one (an NVIDIA GPU: its CUDA build
# is installed too; a TPU VM's /dev/accel* or /dev/vfio); the CPU pin only
# where there is none (and where libtpu would print TPU errors on start).
ACCELERATOR := $(shell (nvidia-smi -L 2>/dev/null | grep -q GPU && echo gpu) || (ls /dev/accel* /dev/vfio/[0-9]* >/dev/null 2>&1 && echo tpu))
comma := ,
EXTRAS := test$(if $(filter gpu,$(ACCELERATOR)),$(comma)cuda)
ifeq ($(ACCELERATOR),gpu)
export JAX_PLATFORMS ?= cuda,cpu
else ifeq ($(ACCELERATOR),)
export JAX_PLATFORMS ?= cpu
endif

# TIER=jax: the tests that a jax release can break (ops, layers, optimizer,
# Pallas kernels in interpret mode, GPU export, the deviceless TPU compile
# with the matching libtpu, dispatch, sharding, the benchmarks' smoke tests,
# the library's doctests); TIER=full (default): the whole fast suite.
TIER ?= full
JAX_TIER := tests/test_adder_ops.py tests/test_layers.py tests/test_optim.py \
  tests/test_optim_sharding.py tests/test_validation.py \
  tests/test_pallas_adder.py tests/test_pallas_conv.py tests/test_pallas_kernels.py \
  tests/test_pallas_lowering.py tests/test_pallas_conv_lowering.py \
  tests/test_pallas_sharding.py tests/test_pallas_benchmark.py \
  tests/test_platform_dispatch.py tests/test_accelerator_compile.py \
  tests/test_benchmarks.py tests/test_mosaic_gpu.py tests/test_export.py \
  tests/test_attention.py tests/test_attention_nnx.py tests/test_bn_warning.py \
  tests/test_attention_sharding.py tests/test_explicit_sharding.py \
  adderjax pallas_kernels
TESTS_full :=
TESTS_jax := $(JAX_TIER)
ifeq ($(filter $(TIER),full jax),)
$(error TIER must be full or jax, got '$(TIER)')
endif

.PHONY: venv run test test-all clean

# The main job: the adder LeNet-5-BN on real MNIST (3 epochs, minutes on 2 cores);
# `make run CONFIG=experiments/configs/lenet5_mnist.py:full` is the paper's 50-epoch recipe.
CONFIG ?= experiments/configs/lenet5_mnist.py
WORKDIR ?= workdirs/$(subst :,_,$(notdir $(basename $(CONFIG))))$(if $(findstring :,$(CONFIG)),_$(lastword $(subst :, ,$(CONFIG))))

$(VENV)/.installed: pyproject.toml
	$(PYTHON_EXE) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

venv: $(VENV)/.installed

run: venv
	$(PY) -m experiments.fetch_data mnist
	$(PY) -m experiments.main --config $(CONFIG) --workdir $(WORKDIR)

# The suite CI runs: everything but the tests marked slow (minutes on 2 cores).
test: venv
	$(PY) -m pytest -n 2 -q -m 'not slow' $(TESTS_$(TIER))

# Everything, the slow tests included (ImageNet-size models, adder variants of
# the parallel/resume/config smoke tests, the deviceless TPU compile).
test-all: venv
	$(PY) -m pytest -n 2 -q

# The device check (experiments/benchmarks/device_check.py): on a GPU, the
# Pallas kernels checked and timed against cuDNN, XLA and the unfold baseline,
# the ResNet-20 train step and a short MNIST run, in at most 6 minutes; the
# smoke mode without one. Writes $(OUT)/device_check.md and .json. JAX picks
# the accelerator: the CPU pin above is dropped for this target.
OUT ?= workdirs/device_check
.PHONY: device-check
device-check: venv
	env -u JAX_PLATFORMS $(PY) -m experiments.benchmarks.device_check $(OUT) $(ARGS)

# The documentation site (docs/conf.py): the API reference generated from
# the docstrings, the tutorial and the design notes, into build/docs (open
# build/docs/index.html). Every warning fails the build: a cross-reference to
# a renamed or misspelt name (nitpicky), a docstring docutils cannot parse.
# tests/test_docs_site.py runs the same build (these flags) in the suite.
DOCS_OUT ?= build/docs
SPHINX_FLAGS := -E -W --keep-going -n -b html
.PHONY: docs
docs: venv
	$(PY) -m sphinx $(SPHINX_FLAGS) docs $(DOCS_OUT)

clean:
	rm -rf $(VENV) build *.egg-info
