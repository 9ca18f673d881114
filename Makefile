# Set-up and entry points. `make run` and `make test` work on a fresh machine:
# they create .venv, install the project and its data, and go.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export JAX_PLATFORMS ?= cpu

.PHONY: venv run test test-all clean

# The main job: the adder LeNet-5-BN on real MNIST (3 epochs, minutes on 2 cores);
# `make run CONFIG=experiments/configs/lenet5_mnist.py:full` is the paper's 50-epoch recipe.
CONFIG ?= experiments/configs/lenet5_mnist.py
WORKDIR ?= workdirs/$(subst :,_,$(notdir $(basename $(CONFIG))))$(if $(findstring :,$(CONFIG)),_$(lastword $(subst :, ,$(CONFIG))))

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

run: venv
	$(PY) -m experiments.fetch_data mnist
	$(PY) -m experiments.main --config $(CONFIG) --workdir $(WORKDIR)

# The suite CI runs: everything but the tests marked slow (minutes on 2 cores).
test: venv
	$(PY) -m pytest -n 2 -q -m 'not slow'

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

clean:
	rm -rf $(VENV) build *.egg-info
