"""Tests of the MNIST reproduction (experiments.reproduce, reproduce_lib).

References are independent of the code under test: scipy's distribution
fits, the paper's formulas written in numpy, flax's ``nn.max_pool``, the
numbers of PAPER.md. The end-to-end test runs the ``--quick`` command on
tiny synthetic IDX files.
"""

import functools
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from adderjax import optim
from experiments import cli
from experiments import reproduce
from experiments import testing
from experiments.reproduce_lib import analysis
from experiments.reproduce_lib import lenetpp
from experiments.reproduce_lib import plan as plan_lib

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


# ----------------------------------------------------------------------------
# analysis


@pytest.mark.parametrize('dist', ['laplace', 'norm'])
def test_compare_fits_matches_scipy(dist):
  rng = np.random.default_rng(1)
  w = (rng.laplace(0.3, 0.7, size=5001) if dist == 'laplace'
       else rng.normal(-0.2, 1.3, size=5001))
  fits = analysis.compare_fits(w.astype(np.float32))
  loc, scale = stats.laplace.fit(w)
  mean, std = stats.norm.fit(w)
  np.testing.assert_allclose(fits['laplace']['loc'], loc, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(fits['laplace']['scale'], scale, rtol=1e-5)
  np.testing.assert_allclose(fits['gaussian']['mean'], mean, atol=1e-6)
  np.testing.assert_allclose(fits['gaussian']['std'], std, rtol=1e-5)
  ll_l = stats.laplace.logpdf(w, loc, scale).sum()
  ll_g = stats.norm.logpdf(w, mean, std).sum()
  np.testing.assert_allclose(fits['laplace']['loglik'], ll_l, rtol=1e-5)
  np.testing.assert_allclose(fits['gaussian']['loglik'], ll_g, rtol=1e-5)
  assert fits['better'] == ('laplace' if dist == 'laplace' else 'gaussian')
  np.testing.assert_allclose(fits['excess_kurtosis'],
                             stats.kurtosis(w, fisher=True), rtol=1e-4)


def test_compare_fits_rejects_constant_weights():
  with pytest.raises(ValueError, match='constant'):
    analysis.compare_fits(np.ones(10))
  with pytest.raises(ValueError, match='at least two'):
    analysis.compare_fits(np.ones(1))


def test_adaptive_scales_match_optax_transform():
  """alpha_l from analysis == the library's adaptive-LR update / gradient."""
  rng = np.random.default_rng(0)
  grads = {'a': {'kernel': rng.normal(size=(3, 3, 2, 4)) * 1e-3},
           'b': {'kernel': rng.normal(size=(5, 7)) * 0.3},
           'bn': {'scale': rng.normal(size=4)}}
  mask = {'a': {'kernel': True}, 'b': {'kernel': True},
          'bn': {'scale': False}}
  scales = analysis.adaptive_scales(grads, mask, eta=0.2)
  assert set(scales) == {'a/kernel', 'b/kernel'}
  for name in ('a', 'b'):
    g = grads[name]['kernel']
    expected = 0.2 * math.sqrt(g.size) / np.linalg.norm(g)  # paper eq. 13
    np.testing.assert_allclose(scales[f'{name}/kernel'], expected, rtol=1e-12)
  tx = optim.scale_by_adaptive_lr(eta=0.2)
  g32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads)
  for name in ('a', 'b'):
    u, _ = tx.update(g32[name], tx.init(g32[name]))
    ratio = np.asarray(u['kernel']) / np.asarray(g32[name]['kernel'])
    np.testing.assert_allclose(ratio, scales[f'{name}/kernel'], rtol=1e-4)


def test_geometric_mean_round_sig_mean_std():
  assert analysis.geometric_mean([2.0, 8.0]) == pytest.approx(4.0)
  assert analysis.round_sig(0.0004567) == pytest.approx(0.00046)
  mean, std = analysis.mean_std([0.99, 0.993, 0.995])
  assert mean == pytest.approx(np.mean([0.99, 0.993, 0.995]))
  assert std == pytest.approx(np.std([0.99, 0.993, 0.995], ddof=1))
  with pytest.raises(ValueError, match='positive'):
    analysis.geometric_mean([1.0, -1.0])


# ----------------------------------------------------------------------------
# LeNet++-style model


def test_max_pool_matches_flax_values_and_grads():
  x = jax.random.normal(jax.random.key(0), (2, 7, 9, 3))
  ref = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')
  np.testing.assert_array_equal(lenetpp.max_pool_2x2(x), ref(x))
  loss = lambda f: lambda x: jnp.sum(f(x) ** 3)
  np.testing.assert_allclose(jax.grad(loss(lenetpp.max_pool_2x2))(x),
                             jax.grad(loss(ref))(x), rtol=1e-6)


def test_lenetpp_adder_classifier_is_l1_distance():
  """Adder logits = BN(-||f - w_c||_1) with the features the model sows."""
  model = lenetpp.create_lenetpp(kind='adder', num_classes=10)
  x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(2), x)
  logits, inter = jax.jit(functools.partial(
      model.apply, train=False, mutable=['intermediates']))(variables, x)
  f = np.asarray(inter['intermediates']['features'][0], np.float64)
  assert f.shape == (4, 2)
  w = np.asarray(variables['params']['classifier']['kernel'], np.float64)
  bn = variables['batch_stats']['classifier_bn']
  bnp = variables['params']['classifier_bn']
  dist = -np.abs(f[:, :, None] - w[None]).sum(1)
  expected = ((dist - np.asarray(bn['mean'])) /
              np.sqrt(np.asarray(bn['var']) + 1e-5) * np.asarray(bnp['scale'])
              + np.asarray(bnp['bias']))
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_lenetpp_cnn_classifier_is_affine():
  model = lenetpp.create_lenetpp(kind='cnn', num_classes=10)
  x = jax.random.uniform(jax.random.key(1), (3, 28, 28, 1))
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(2), x)
  logits, inter = jax.jit(functools.partial(
      model.apply, train=False, mutable=['intermediates']))(variables, x)
  f = np.asarray(inter['intermediates']['features'][0])
  p = variables['params']['classifier']
  np.testing.assert_allclose(logits, f @ np.asarray(p['kernel']) +
                             np.asarray(p['bias']), rtol=1e-5, atol=1e-5)


def test_lenetpp_adder_mask_and_errors():
  model = lenetpp.create_lenetpp(kind='adder')
  mask = optim.adder_mask(model, jnp.zeros((1, 28, 28, 1)), train=False)
  kernels = {k: v['kernel'] for k, v in mask.items() if 'kernel' in v}
  assert kernels == {'stem': False, 'conv1': True, 'conv2': True,
                     'feature': True, 'classifier': True}
  with pytest.raises(ValueError, match="'bnn'"):
    lenetpp.create_lenetpp(kind='bnn')
  with pytest.raises(ValueError, match='sign'):
    lenetpp.create_lenetpp(kind='cnn', grad='sign')
  with pytest.raises(ValueError, match=r'\(8,\)'):
    lenetpp.create_lenetpp(widths=(8,))


# ----------------------------------------------------------------------------
# Plans and configs


def test_full_plan_is_the_papers_recipe():
  """PAPER.md sec. 5: lr 0.1 cosine, 50 epochs, batch 256 (+ SGD 0.9, 5e-4)."""
  plan = plan_lib.make_plan('full')
  for part in (plan.main, plan.ablation, plan.eta, plan.figure):
    c = plan_lib.make_config(part=part, data=plan_lib.DataOptions())
    assert c.num_epochs == 50
    assert c.steps_per_epoch == -1      # whole training set each epoch
    assert c.batch_size == 256
    assert c.optimizer.learning_rate == 0.1
    assert c.optimizer.momentum == 0.9
    assert c.optimizer.weight_decay == 5e-4
    assert c.optimizer.schedule == 'cosine_epoch'
    assert c.optimizer.eta == 0.2
    assert c.optimizer.scaling == 'adaptive'
    assert not c.optimizer.nesterov


def test_chunked_part_config():
  data = plan_lib.DataOptions()
  assert data.steps_per_epoch == 60000 // 256
  c = plan_lib.make_config(part=plan_lib.Part(1.5, 4), data=data,
                           recalibrate=True, grad='sign', scaling='ilr',
                           ilr_factor=30.0)
  assert c.num_epochs == 6 and c.steps_per_epoch == 234 // 4
  assert c.bn_recalibration_batches == plan_lib.RECAL_BATCHES
  assert c.dataset.max_eval_examples == plan_lib.CURVE_EVAL_EXAMPLES
  assert c.model.grad == 'sign' and c.optimizer.ilr_factor == 30.0
  with pytest.raises(ValueError, match='multiple'):
    plan_lib.Part(1.3, 4)
  with pytest.raises(ValueError, match='plan must be'):
    plan_lib.make_plan('huge')
  with pytest.raises(ValueError, match='main_epochs'):
    plan_lib.make_plan('default', main_epochs=0)
  assert plan_lib.make_plan('default', main_epochs=3,
                            seeds=(0, 1)).main.epochs == 3


@pytest.mark.parametrize('argv, message', [
    (['mnist', '--out', 'x', '--quick', '--full'], 'At most one of'),
    (['mnist', '--out', 'x', '--seeds', 'a,b'], 'comma-separated ints'),
    (['mnist', '--out', 'x', '--seeds='], '--seeds is empty'),
    (['mnist', '--out', 'x', '--epochs', '0'], 'positive int'),
    (['cifar', '--out', 'x'], 'mnist or report'),
    (['mnist'], '--out must have a value'),
])
def test_cli_rejects_bad_arguments(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    cli.call(reproduce.main, reproduce.define_flags, argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert message in err and err.startswith('error: ') and err.count(
      '\n') == 1, err


# ----------------------------------------------------------------------------
# End to end


def test_quick_reproduction_end_to_end(tmp_path):
  """The --quick command on tiny synthetic IDX files: every output made.

  In the default suite (about 2 minutes on 2 cores): it is the only test of
  the whole pipeline, and when it was marked slow a NaN loss from the adder
  layers' gradients under jit crashed Figure 1 without CI noticing.
  """
  data_dir = testing.write_synthetic_mnist(str(tmp_path / 'mnist'),
                                           n_train=48, n_test=24)
  out = tmp_path / 'out'
  assert cli.call(reproduce.main, reproduce.define_flags, [
      'mnist', '--out', str(out), '--quick', '--data_dir', data_dir,
      '--batch_size', '16', '--eval_batch_size', '24',
      '--max_steps_per_epoch', '2', '--seeds', '0']) == 0
  names = {'main_curves.png', 'fig4_ablation.png', 'eta_curves.png',
           'eta_sensitivity.png', 'fig1_features.png', 'fig2_filters.png',
           'fig3_histograms.png', 'results.json', 'report.md'}
  assert names <= set(os.listdir(out))
  for name in names - {'results.json', 'report.md'}:
    with open(out / name, 'rb') as f:
      assert f.read(8) == PNG_MAGIC, name
  stored = json.loads((out / 'results.json').read_text())
  assert stored['plan']['name'] == 'quick'
  assert stored['steps_per_epoch'] == 2
  for kind in ('cnn', 'adder', 'bnn'):
    (run,) = stored['main'][kind]
    assert run['final']['count'] == 24
    assert 0.0 <= run['final']['top1'] <= 1.0
    assert len(run['eval_curve']) == 1 and run['train_curve']
    assert all(math.isfinite(point[1]) for point in run['train_curve']), kind
    assert 'recalibrated' in run['extra']
  assert len(stored['ablation']) == 6
  assert {(r['extra']['grad'], r['extra']['scaling'])
          for r in stored['ablation']} == {
              (g, s) for g in ('full_precision', 'sign')
              for s in ('adaptive', 'ilr', 'none')}
  for r in stored['ablation']:
    assert len(r["eval_curve"]) == 1          # 0.5 epoch, 2 evals / epoch
    assert r['final']['count'] == 24          # final: the whole test set
  assert [e['eta'] for e in stored['eta']] == [1.0, 0.5, 0.2, 0.1, 0.05]
  assert stored['eta'][2]['run'] == 'ablation_full_precision_adaptive'
  assert stored['ilr_factor'] > 0
  assert len(stored['weight_fits']) == 6
  for kind in ('cnn', 'adder'):
    fig = stored['figure1'][kind]
    assert fig['extra']['test_top1_from_features_pass'] == pytest.approx(
        fig['final']['top1'])
  report = (out / 'report.md').read_text()
  assert 'python -m experiments.reproduce mnist --out' in report
  assert 'total wall time' in report
  assert 'points short' in report   # a 2-step run is far from 99.4 %
  for name in names - {'results.json', 'report.md'}:
    assert f'({name})' in report
  # `report` redraws the curves and the text from results.json: the same
  # text plus a note of the redraw.
  os.remove(out / 'report.md')
  os.remove(out / 'fig4_ablation.png')
  assert cli.call(reproduce.main, reproduce.define_flags,
                  ['report', '--out', str(out)]) == 0
  redrawn = (out / 'report.md').read_text()
  assert 'redrawn from `results.json` by `python -m experiments.reproduce ' \
      'report --out' in redrawn
  assert set(report.splitlines()) <= set(redrawn.splitlines())
  with open(out / 'fig4_ablation.png', 'rb') as f:
    assert f.read(8) == PNG_MAGIC
  assert len(json.loads((out / 'results.json').read_text())[
      'rerendered']) == 1
