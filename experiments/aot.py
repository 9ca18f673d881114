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

``--search_remat`` (same environment) compiles the CNN twin, then the AddNN
under every recompute candidate, and prints which one the rule of
:func:`search_remat` picks (``experiments.steps.TPU_AUTO_REMAT`` holds the
choices made so).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
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
                    'backward pass (config.remat_blocks=all).',
                    flag_values=fv)
  flags.DEFINE_list('remat_stages', None,
                    'ResNets: recompute the blocks of these stages only, '
                    'counted from 1 (config.remat_blocks=1,2 for 1,2).',
                    flag_values=fv)
  flags.DEFINE_bool('search_remat', False,
                    'Compile the CNN twin as configured, then the adder '
                    'model under every recompute candidate (step policy x '
                    'ResNet stages whose blocks are recomputed), and pick '
                    'the one with the fewest adder kernel calls, then bytes '
                    'accessed, within --remat_budget of the CNN\'s memory.',
                    flag_values=fv)
  flags.DEFINE_float('remat_budget', 1.5,
                     '--search_remat: temporary memory allowed, as a '
                     'multiple of the CNN twin\'s.', lower_bound=1.0,
                     flag_values=fv)


def remat_candidates(config: ml_collections.ConfigDict
                     ) -> list[tuple[str, bool | tuple[int, ...]]]:
  """``(policy, remat_blocks)`` pairs that ``--search_remat`` compiles.

  Every step policy, times (for a ResNet, whose ``model.overrides`` give its
  ``stage_sizes``) every set of stages whose blocks are recomputed: no stage,
  each subset, all of them (``True``).

  Examples:
    >>> import ml_collections
    >>> c = ml_collections.ConfigDict(dict(model=dict(overrides=dict(
    ...     stage_sizes=(3, 3)))))
    >>> remat_candidates(c)  # doctest: +NORMALIZE_WHITESPACE
    [('layer_outputs', False), ('layer_outputs', (1,)),
     ('layer_outputs', (2,)), ('layer_outputs', True), ('none', False),
     ('none', (1,)), ('none', (2,)), ('none', True)]
  """
  stages = len(config.model.overrides.get('stage_sizes', ()))
  subsets = [False]
  for r in range(1, stages):
    subsets += list(itertools.combinations(range(1, stages + 1), r))
  if stages:
    subsets.append(True)
  return [(policy, blocks) for policy in ('layer_outputs', 'none')
          for blocks in subsets]


def search_remat(config: ml_collections.ConfigDict, topology: str,
                 budget: float = 1.5, log=print) -> tuple[dict, list[dict]]:
  """Compiles the recompute candidates of the adder model for ``topology``.

  The baseline is the CNN twin compiled as ``config`` says (its default
  recompute). A candidate fits when its temporary memory is at most
  ``budget`` times the baseline's; of those, the chosen one runs the fewest
  adder kernel calls (a recomputed block runs its adder forwards again),
  then moves the fewest bytes.

  Returns:
    ``(cnn_stats, rows)``: each row has ``policy``, ``remat_blocks``,
    :func:`analyse`'s figures, ``vs_cnn`` (the memory ratio), ``fits`` and
    ``chosen`` (True for one row, none if nothing fits).
  """
  cnn_config = copy.deepcopy(config)
  cnn_config.model.kind = 'cnn'
  cnn = analyse(compile_for_tpu(cnn_config, topology)[0])
  log(f'cnn ({cnn_config.remat}): {cnn["temp_mb"]:.1f} MB')
  rows = []
  for policy, blocks in remat_candidates(config):
    c = copy.deepcopy(config)
    c.model.kind = 'adder'
    c.remat = policy
    c.remat_blocks = _blocks_word(blocks)
    stats = analyse(compile_for_tpu(c, topology)[0])
    ratio = (stats['temp_mb'] / cnn['temp_mb'] if cnn['temp_mb'] else
             1.0 if not stats['temp_mb'] else float('inf'))
    row = dict(policy=policy, remat_blocks=blocks, **stats, vs_cnn=ratio)
    row['fits'] = row['vs_cnn'] <= budget
    row['chosen'] = False
    rows.append(row)
    log(f'adder ({policy}, blocks {blocks}): {stats["temp_mb"]:.1f} MB, '
        f'{row["vs_cnn"]:.2f}x, {stats["mosaic_calls"]} kernel calls')
  fitting = [r for r in rows if r['fits']]
  if fitting:
    min(fitting, key=lambda r: (r['mosaic_calls'], r['bytes_accessed_gb'],
                                r['temp_mb']))['chosen'] = True
  return cnn, rows


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
  if fv.search_remat:
    _print_search(fv)
    return
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
      config.remat_blocks = 'all'
    elif fv.remat_stages:
      config.remat_blocks = _blocks_word(_stages(fv.remat_stages))
    if fv.implementation and kind == 'adder':
      config.model.implementation = fv.implementation
    compiled, spec = compile_for_tpu(config, fv.topology)
    rows.append((kind, _recompute(spec), analyse(compiled)))
  keys = list(rows[0][2])
  print(f'{cli.config_file_name(fv)} {fv.topology} batch {config.batch_size} '
        f'({config.parallelism}, remat {config.remat}), per chip:')
  print('| kind | recompute | ' + ' | '.join(keys) + ' |')
  print('|' + '---|' * (len(keys) + 2))
  for kind, recompute, stats in rows:
    print(f'| {kind} | {recompute} | '
          + ' | '.join(f'{stats[k]:.4g}' for k in keys) + ' |')


def _blocks_word(blocks) -> str:
  """``config.remat_blocks`` for a model's ``remat_blocks`` value."""
  if isinstance(blocks, bool):
    return 'all' if blocks else 'none'
  return ','.join(map(str, blocks))


def _stages(values: list[str]) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in values)
  except ValueError:
    raise errors.UsageError(
        f'--remat_stages {",".join(values)}: stage numbers, counted from 1, '
        f'comma-separated (e.g. 1,2).') from None


def _recompute(spec: TrainStepSpec) -> str:
  """The step policy and recomputed blocks the spec was built with."""
  c = spec.config
  policy = steps.resolve_remat(c.remat, 'tpu', (c.model.name, c.model.kind))
  blocks = getattr(spec.experiment.model, 'remat_blocks', False)
  if blocks is True:
    return f'{policy}, every block'
  if blocks:
    return f'{policy}, blocks of stages {",".join(map(str, blocks))}'
  return policy


def _print_search(fv: flags.FlagValues) -> None:
  config = copy.deepcopy(fv.config)
  if fv.parallelism:
    config.parallelism = fv.parallelism
  if fv.batch_size:
    config.batch_size = fv.batch_size
  cnn, rows = search_remat(config, fv.topology, fv.remat_budget,
                           log=lambda m: print(m, flush=True))
  print(f'\n{cli.config_file_name(fv)} {fv.topology} batch '
        f'{config.batch_size} ({config.parallelism}), per chip; CNN twin '
        f'({config.remat}): {cnn["temp_mb"]:.1f} MB, '
        f'{cnn["bytes_accessed_gb"]:.3g} GB:')
  print('| policy | blocks recomputed | temp MB | vs CNN | GB accessed | '
        'kernel calls | |')
  print('|---|---|---:|---:|---:|---:|---|')
  for r in rows:
    mark = ('**chosen**' if r['chosen'] else
            '' if r['fits'] else f'over {fv.remat_budget}x')
    print(f'| {r["policy"]} | {r["remat_blocks"]} | {r["temp_mb"]:.1f} | '
          f'{r["vs_cnn"]:.2f}x | {r["bytes_accessed_gb"]:.3g} | '
          f'{r["mosaic_calls"]} | {mark} |')


if __name__ == '__main__':
  cli.run(main, define_flags)
