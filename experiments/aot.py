"""Compile the experiments' own train step for a device this host does not have.

The step compiled here is the one :func:`experiments.train.train_and_evaluate`
runs: the model, optimizer and step built from a config, placed and compiled by
the config's runner (:mod:`experiments.parallel`), only with shape structs
instead of data, and for a target chosen on the command line:

* TPU: an AOT compile for a topology through libtpu
  (``jax.experimental.topologies``), e.g. ``v5e:2x4`` (8 chips), with the
  jit runner (mesh over the topology's devices) or the pmap runner. Needs the
  ``libtpu`` package and, on a host without a TPU, the environment of
  :data:`TPU_COMPILE_ENV` (set before JAX starts).
* GPU: a ``jax.export`` for ``cuda`` (lowering only: StableHLO holding the
  Triton kernels; no CUDA toolkit needed).

Nothing patches the library: ``implementation=None`` lowers to the Pallas
kernels because the target platform is an accelerator (see
:mod:`adderjax.ops.backends`). :func:`analyse` reads XLA's memory and cost
analysis and counts the kernels and collectives of the compiled HLO.

Usage (prints one row per step)::

  env JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 TPU_ACCELERATOR_TYPE=v5litepod-8 \\
      TPU_WORKER_HOSTNAMES=localhost ALLOW_MULTIPLE_LIBTPU_LOAD=1 \\
      python -m experiments.aot --config experiments/configs/resnet20_cifar10.py \\
      --kinds adder,cnn --topology v5e:2x4 --batch_size 1024
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any

from absl import flags
import jax
from jax.experimental import topologies
import ml_collections

from adderjax import models
from experiments import cli
from experiments import errors
from experiments import experiment
from experiments import parallel
from experiments import steps

#: Environment for a deviceless TPU compile on a host without a TPU (libtpu
#: reads it when JAX starts). ``TPU_ACCELERATOR_TYPE`` only has to name some
#: TPU: the topology of the compile is the one given to
#: :func:`tpu_topology`.
TPU_COMPILE_ENV = {
    'JAX_PLATFORMS': 'cpu',
    'TPU_SKIP_MDS_QUERY': '1',
    'TPU_ACCELERATOR_TYPE': 'v5litepod-8',
    'TPU_WORKER_HOSTNAMES': 'localhost',
    'ALLOW_MULTIPLE_LIBTPU_LOAD': '1',
}

@dataclasses.dataclass
class TrainStepSpec:
  """What a runner compiles for one config: the step and its inputs' shapes."""
  step: Any
  state: Any
  batch: dict[str, jax.ShapeDtypeStruct]
  runner: Any
  config: ml_collections.ConfigDict
  #: Adder kernels in the model (each is one forward and one input-gradient
  #: kernel call on an accelerator).
  adder_layers: int
  #: The experiment the step was built from (model, optimizer, shapes).
  experiment: experiment.Experiment | None = None


def train_step_spec(config: ml_collections.ConfigDict, devices=None
                    ) -> TrainStepSpec:
  """The config's train step as its runner compiles it, on ``devices``.

  Args:
    config: an experiments config (``parallelism`` picks the runner,
      ``batch_size`` is the global batch).
    devices: target devices (e.g. a TPU topology's); default: this host's.

  Returns:
    The jitted (jit runner: inside the mesh) or pmapped step and the shape
    structs of its state and batch, placed as the runner places them.
  """
  exp = experiment.Experiment.from_config(config, devices=devices, data=False,
                                          steps_per_epoch=100)
  parallel.check_divisible(config.batch_size, exp.runner.num_devices)
  adder_layers = sum(jax.tree.leaves(exp.adder_mask()))
  return TrainStepSpec(exp.train_step, exp.abstract_state(),
                       exp.abstract_batch(), exp.runner, exp.config,
                       adder_layers, exp)


def tpu_topology(name: str = 'v5e:2x4'):
  """The devices of a TPU topology (``'v5e:2x4'``, ``'v4:2x2x1'``, ...).

  Generations whose chips have two TensorCores (v4, v5p) are described in
  megacore mode, one device per chip, as a real host runs them (and as
  ``jax.make_mesh`` requires): ``v4:2x2x1`` is 4 devices, not 8 cores.
  """
  desc = topologies.get_topology_desc(name, 'tpu')
  if any(getattr(d, 'core_on_chip', 0) for d in desc.devices):
    desc = topologies.get_topology_desc(name, 'tpu',
                                        chip_config_name='megacore')
  return desc.devices


def compile_for_tpu(config: ml_collections.ConfigDict,
                    topology: str = 'v5e:2x4'):
  """AOT-compiles the config's train step for a TPU topology.

  Returns:
    ``(compiled, spec)``.
  """
  spec = train_step_spec(config, tpu_topology(topology))
  return spec.step.lower(spec.state, spec.batch).compile(), spec


def export_for(config: ml_collections.ConfigDict,
               platforms=('cuda',)) -> jax.export.Exported:
  """``jax.export`` of the config's train step for ``platforms`` (1 device)."""
  config = ml_collections.ConfigDict(config)
  config.parallelism = 'jit'
  spec = train_step_spec(config, jax.devices()[:1])
  unsharded = lambda t: jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), t)
  checks = [jax.export.DisabledSafetyCheck.custom_call(name)
            for name in ('__gpu$xla.gpu.triton', 'tpu_custom_call')]
  with jax.set_mesh(spec.runner.mesh):
    return jax.export.export(spec.step.jitted, platforms=list(platforms),
                             disabled_checks=checks)(
                                 unsharded(spec.state), unsharded(spec.batch))


def _count(pattern: str, text: str) -> int:
  return len(re.findall(pattern, text))


def analyse(compiled) -> dict[str, float]:
  """Memory, cost and kernel counts of a compiled step (per device).

  Returns:
    ``temp_mb`` (XLA's temp buffers), ``argument_mb``, ``output_mb``,
    ``gflops`` and ``bytes_accessed_gb`` (XLA's cost analysis; Mosaic calls
    count only their operands), ``mosaic_calls``, ``all_gathers`` and
    ``all_reduces`` in the HLO.
  """
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  hlo = compiled.as_text()
  mb = 1 / 2**20
  return {
      'temp_mb': mem.temp_size_in_bytes * mb,
      'argument_mb': mem.argument_size_in_bytes * mb,
      'output_mb': mem.output_size_in_bytes * mb,
      'gflops': float(cost.get('flops', 0.0)) / 1e9,
      'bytes_accessed_gb': float(cost.get('bytes accessed', 0.0)) / 1e9,
      'mosaic_calls': _count(r'custom_call_target="tpu_custom_call"', hlo),
      'all_gathers': _count(r'= [^=]*\ball-gather(-start)?\(', hlo),
      'all_reduces': _count(r'= [^=]*\ball-reduce(-start)?\(', hlo),
  }


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines this program's flags on ``flag_values``."""
  fv = flag_values
  cli.define_config_file(fv, help_string='Config file[:arg], as for '
                         'experiments.main (--config.KEY=VALUE overrides).')
  flags.DEFINE_string('kinds', 'adder,cnn',
                      'Model kinds to compile, comma-separated.',
                      flag_values=fv)
  flags.DEFINE_string('topology', 'v5e:2x4', 'TPU topology to compile for.',
                      flag_values=fv)
  flags.DEFINE_enum('parallelism', None, ['jit', 'pmap'],
                    'The runner (default: the config\'s).', flag_values=fv)
  flags.DEFINE_integer('batch_size', None,
                       'Global batch (default: the config\'s).',
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_string('implementation', None,
                      "model.implementation (default None: Pallas on TPU); "
                      "'xla' for the XLA path.", flag_values=fv)
  flags.DEFINE_enum('remat', None, list(steps.REMAT_CHOICES),
                    "The step's activation recompute (default: the "
                    "config's remat).", flag_values=fv)
  flags.DEFINE_bool('remat_blocks', False,
                    'ResNets: recompute every residual block in the '
                    'backward pass (model.overrides.remat_blocks=True).',
                    flag_values=fv)


def main(flag_values: flags.FlagValues, args: list[str]) -> None:
  """Compiles the config's train step per kind; prints one row each."""
  cli.no_arguments(args)
  fv = flag_values
  kinds = [k.strip() for k in fv.kinds.split(',')]
  unknown = [k for k in kinds if k not in models.KINDS]
  if unknown:  # before compiling anything (minutes per kind)
    raise errors.UsageError(
        f'--kinds {fv.kinds}: unknown kind(s) {unknown}; use '
        f'{", ".join(map(repr, models.KINDS))}, comma-separated.')
  try:
    tpu_topology(fv.topology)
  except (jax.errors.JaxRuntimeError, ValueError) as e:
    raise errors.UsageError(
        f'--topology {fv.topology!r}: {str(e).strip().splitlines()[0]} '
        "(e.g. 'v5e:2x4', 'v4:2x2x1').") from e
  rows = []
  for kind in kinds:
    config = copy.deepcopy(fv.config)
    config.model.kind = kind
    if fv.parallelism:
      config.parallelism = fv.parallelism
    if fv.batch_size:
      config.batch_size = fv.batch_size
    if fv.remat:
      config.remat = fv.remat
    if fv.remat_blocks:
      config.model.overrides.remat_blocks = True
    if fv.implementation and kind == 'adder':
      config.model.implementation = fv.implementation
    stats = analyse(compile_for_tpu(config, fv.topology)[0])
    rows.append((kind, stats))
  keys = list(rows[0][1])
  print(f'{cli.config_file_name(fv)} {fv.topology} batch {config.batch_size} '
        f'({config.parallelism}, remat {config.remat}: '
        f'{steps.resolve_remat(config.remat, "tpu")}'
        f'{", blocks recomputed" if fv.remat_blocks else ""}), per chip:')
  print('| kind | ' + ' | '.join(keys) + ' |')
  print('|' + '---|' * (len(keys) + 1))
  for kind, stats in rows:
    print(f'| {kind} | ' + ' | '.join(f'{stats[k]:.4g}' for k in keys) + ' |')


if __name__ == '__main__':
  cli.run(main, define_flags)
