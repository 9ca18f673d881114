"""The experiments' own train step, compiled for accelerators this host lacks.

The step is the one the runner compiles in ``experiments.train`` (model,
optimizer and step from a config, placed by the config's runner), built by
:mod:`experiments.aot` with shape structs; nothing is patched:
``implementation=None`` reaches the Pallas kernels because the target is an
accelerator.

* TPU (through libtpu, in a subprocess with :data:`experiments.aot.
  TPU_COMPILE_ENV`): the jit runner (mesh over a v5e 2x4 topology, traced
  under ``jax.set_mesh``) and the pmap runner compile, the HLO holds the
  Mosaic kernels (forward + input gradient of every adder layer) and no
  all-gather; a user's own ``jit`` of the same step with sharded inputs and
  no mesh compiles too, on the XLA path, with a warning that says what to do.
* GPU: ``jax.export`` for ``cuda`` holds the Triton kernels.

ResNet-20 with the jit runner is in the default suite; the other models,
runners and generations are marked slow (each TPU compile takes about a
minute on 2 cores).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    'lenet5': 'experiments/configs/lenet5_mnist.py',
    'resnet20': 'experiments/configs/resnet20_cifar10.py',
    'vgg_small': 'experiments/configs/vgg_small_cifar10.py',
    'resnet50': 'experiments/configs/resnet50_imagenet.py',
}


def compile_case(model: str, runner: str, topology: str, batch: int,
                 options: dict | None = None) -> dict:
  """Compiles one step for TPU; runs inside the libtpu subprocess.

  ``options``: ``kind`` (default the config's), ``remat`` (the config's
  ``remat``), ``remat_blocks`` (the ResNet field).
  """
  from experiments import aot  # pylint: disable=g-import-not-at-top
  from experiments import cli  # pylint: disable=g-import-not-at-top
  options = options or {}
  config = cli.load_config_file(CONFIGS[model])
  config.batch_size = batch
  config.model.kind = options.get('kind', config.model.kind)
  config.remat = options.get('remat', config.remat)
  for key, value in options.get('overrides', {}).items():
    config.model.overrides[key] = tuple(value) if isinstance(
        value, list) else value
  if options.get('remat_blocks'):
    config.model.overrides.remat_blocks = True
  if runner == 'search':
    cnn, rows = aot.search_remat(config, topology,
                                 options.get('budget', 1.5), log=lambda m: None)
    return dict(cnn=cnn, rows=rows)
  if runner == 'user_jit':
    # A user's own jit of the same step: sharded inputs, no mesh context.
    spec = aot.train_step_spec(config, aot.tpu_topology(topology))
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      compiled = spec.step.jitted.trace(spec.state, spec.batch).lower(
      ).compile()
    stats = aot.analyse(compiled)
    stats['warned'] = any('jax.set_mesh' in str(w.message) for w in caught)
  else:
    config.parallelism = runner
    compiled, spec = aot.compile_for_tpu(config, topology)
    stats = aot.analyse(compiled)
  stats['adder_layers'] = spec.adder_layers
  blocks = getattr(spec.experiment.model, 'remat_blocks', False)
  stats['remat_blocks'] = list(blocks) if isinstance(blocks, tuple) else blocks
  return stats


def _run_tpu(cases) -> list[dict]:
  if importlib.util.find_spec('libtpu') is None:
    pytest.skip('libtpu is not installed (pip install "jax[tpu]==0.10.2"): '
                'the deviceless TPU compile needs it.')
  from experiments import aot  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, **aot.TPU_COMPILE_ENV)
  env['PYTHONPATH'] = os.pathsep.join(
      [_REPO] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
  proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__), json.dumps(cases)],
      cwd=_REPO, env=env, capture_output=True, text=True, timeout=1800,
      check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULTS ')]
  return json.loads(line[-1][len('RESULTS '):])


def _check_kernels(stats):
  # Forward and input gradient of every adder layer run the Mosaic kernels.
  assert stats['adder_layers'] > 0, stats
  assert stats['mosaic_calls'] == 2 * stats['adder_layers'], stats
  assert stats['all_gathers'] == 0, stats
  assert stats['all_reduces'] > 0, stats  # the gradient all-reduce


def test_resnet20_jit_runner_and_user_jit_compile_for_v5e_2x4():
  # The user's plain jit compiles the XLA adder path: on LeNet-5-BN, whose
  # compile takes seconds (ResNet-20's takes a minute on 2 cores).
  runner, user = _run_tpu([['resnet20', 'jit', 'v5e:2x4', 64],
                           ['lenet5', 'user_jit', 'v5e:2x4', 64]])
  _check_kernels(runner)
  # remat='auto' on TPU: the AddNN's stages 1-2 blocks under nn.remat
  # (experiments.steps.TPU_AUTO_REMAT), with no adder forward run twice.
  assert runner['remat_blocks'] == [1, 2], runner
  assert user['mosaic_calls'] == 0 and user['warned'], user


@pytest.mark.slow
def test_search_remat_picks_the_fewest_kernel_calls_that_fit():
  # A one-stage ResNet (candidates: two step policies x its block
  # recomputed or not). Whatever the figures, the row chosen is the one
  # --search_remat's rule names: within the budget of the CNN twin's
  # memory, the fewest kernel calls, then the fewest bytes; a recomputed
  # block without the layer-outputs policy runs its adder forwards again.
  tiny = dict(overrides=dict(stage_sizes=[1], width=16))
  (result,) = _run_tpu([
      ['resnet20', 'search', 'v5e:2x4', 4096, dict(tiny, budget=1.5)]])
  rows, cnn = result['rows'], result['cnn']
  assert [(r['policy'], r['remat_blocks']) for r in rows] == [
      ('layer_outputs', False), ('layer_outputs', True), ('none', False),
      ('none', True)], rows
  assert rows[3]['mosaic_calls'] > rows[2]['mosaic_calls'], rows
  for r in rows:
    if cnn['temp_mb']:  # (this small CNN may need no temporary buffer)
      assert r['vs_cnn'] == pytest.approx(r['temp_mb'] / cnn['temp_mb'])
    assert r['fits'] == (r['temp_mb'] <= 1.5 * cnn['temp_mb'])
  fitting = [r for r in rows if r['fits']]
  chosen = [r for r in rows if r['chosen']]
  if fitting:
    want = min(fitting, key=lambda r: (r['mosaic_calls'],
                                       r['bytes_accessed_gb'], r['temp_mb']))
    assert chosen == [want], rows
  else:
    assert not chosen, rows


@pytest.mark.slow
def test_resnet20_default_v5e_memory():
  # Issue 27: the experiments' default ResNet-20 AddNN step on v5e 2x4 at
  # 128 images per chip holds at most 1.5x the temporary memory of its CNN
  # twin's default step (docs/roofline.md: 48.4 vs 32.6 MB), and bytes
  # accessed at most 2x, with each adder forward run once.
  adder, cnn = _run_tpu([
      ['resnet20', 'jit', 'v5e:2x4', 1024, dict(kind='adder')],
      ['resnet20', 'jit', 'v5e:2x4', 1024, dict(kind='cnn')]])
  _check_kernels(adder)
  assert cnn['mosaic_calls'] == 0 and cnn['remat_blocks'] is False, cnn
  assert adder['temp_mb'] <= 1.5 * cnn['temp_mb'], (adder, cnn)
  assert adder['bytes_accessed_gb'] <= 2 * cnn['bytes_accessed_gb'], (
      adder, cnn)


@pytest.mark.slow
@pytest.mark.parametrize('model,batch', [('vgg_small', 64),
                                         ('resnet50', 64)])
def test_other_models_both_runners_v5e_2x4(model, batch):
  for stats in _run_tpu([[model, 'jit', 'v5e:2x4', batch],
                         [model, 'pmap', 'v5e:2x4', batch]]):
    _check_kernels(stats)


@pytest.mark.slow
@pytest.mark.parametrize('model', sorted(CONFIGS))
def test_another_generation_v4(model):
  batch = 32 if model == 'resnet50' else 64
  for stats in _run_tpu([[model, 'jit', 'v4:2x2x1', batch],
                         [model, 'pmap', 'v4:2x2x1', batch]]):
    _check_kernels(stats)


@pytest.mark.slow
def test_resnet20_pmap_runner_v5e_2x4():
  (stats,) = _run_tpu([['resnet20', 'pmap', 'v5e:2x4', 64]])
  _check_kernels(stats)


@pytest.mark.slow
def test_resnet20_recomputed_blocks_v5e_memory():
  # ResNet-20 at 128 images per chip (issue 13's case): with every block
  # recomputed, each adder forward runs twice (3 Mosaic calls per layer),
  # and the AddNN step holds at most 1.5x the memory of its CNN twin
  # compiled the same way (docs/roofline.md: 48.2 vs 43.3 MB).
  opts = {'remat': 'none', 'remat_blocks': True}
  adder, cnn = _run_tpu([
      ['resnet20', 'jit', 'v5e:2x4', 1024, dict(opts, kind='adder')],
      ['resnet20', 'jit', 'v5e:2x4', 1024, dict(opts, kind='cnn')]])
  assert adder['mosaic_calls'] == 3 * adder['adder_layers'], adder
  assert cnn['mosaic_calls'] == 0, cnn
  assert adder['all_gathers'] == 0, adder
  assert adder['temp_mb'] <= 1.5 * cnn['temp_mb'], (adder, cnn)
  assert adder['bytes_accessed_gb'] <= 2 * cnn['bytes_accessed_gb'], (
      adder, cnn)


@pytest.mark.parametrize('model', [
    'resnet20', pytest.param('vgg_small', marks=pytest.mark.slow),
    pytest.param('resnet50', marks=pytest.mark.slow)])
def test_train_step_exports_for_cuda_with_triton_kernels(model):
  from experiments import aot  # pylint: disable=g-import-not-at-top
  from experiments import cli  # pylint: disable=g-import-not-at-top
  config = cli.load_config_file(CONFIGS[model])
  config.batch_size = 8
  text = aot.export_for(config, ('cuda',)).mlir_module()
  # Identical layers share one function in the module: count at least one
  # kernel call, and no TPU kernel.
  assert '__gpu$xla.gpu.triton' in text
  assert 'tpu_custom_call' not in text


if __name__ == '__main__':
  results = [compile_case(*case) for case in json.loads(sys.argv[1])]
  print('RESULTS ' + json.dumps(results))
