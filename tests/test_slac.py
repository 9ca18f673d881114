"""The skew-Laplace classifier (SLAC, issue 30): density, losses, head, zoo,
loss terms, per-parameter learning-rate factors, and a `:slac` run.

Every reference here is written independently of adderjax.slac: numpy
float64 with explicit inverses and determinants, the issue's formulas
typed out term by term.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from adderjax import slac
from adderjax.models import create_model
from experiments import errors
from experiments import experiment
from experiments import losses
from experiments import lr_scales
from experiments import testing
from experiments import train
from test_train import tiny_mnist_config


# --- numpy float64 references (the formulas) ------------------------


def ref_log_density(x, mu, sigma, gamma):
  """log f_k(x_n) as (N, K); sigma (K, d, d) matrices."""
  x, mu, sigma, gamma = (np.asarray(a, np.float64)
                         for a in (x, mu, sigma, gamma))
  n, d = x.shape
  const = math.log(2.0**d * math.pi**((d - 1) / 2) * math.gamma((d + 1) / 2))
  out = np.zeros((n, mu.shape[0]))
  for k in range(mu.shape[0]):
    inv = np.linalg.inv(sigma[k])
    alpha = math.sqrt(1.0 + gamma[k] @ inv @ gamma[k])
    _, logdet = np.linalg.slogdet(sigma[k])
    for i in range(n):
      v = x[i] - mu[k]
      out[i, k] = (-const - 0.5 * logdet - math.log(alpha)
                   - alpha * math.sqrt(v @ inv @ v) + v @ inv @ gamma[k])
  return out


def ref_ac_loss(mu, sigma, gamma):
  """L_ac of covariance matrices sigma (K, d, d)."""
  mu, sigma, gamma = (np.asarray(a, np.float64) for a in (mu, sigma, gamma))
  k = mu.shape[0]
  d_mu = np.zeros((k, k))
  d_gamma = np.zeros((k, k))
  for m in range(k):
    for n in range(k):
      v = mu[m] - mu[n]
      d_mu[m, n] = v @ np.linalg.inv(sigma[n]) @ v
      d_gamma[m, n] = (gamma[m] @ gamma[n] / np.linalg.norm(gamma[m])
                       / np.linalg.norm(gamma[n]))
  total = 0.0
  for m in range(k):
    top = max(d_mu[m])
    for n in range(k):
      target = (top - 2 * d_mu[m, n]) / top
      total += (d_gamma[m, n] - target)**2
  return total / k**2


def random_params(rng, k, d, skew=0.5):
  mu = rng.normal(size=(k, d))
  a = rng.normal(size=(k, d, d))
  sigma = a @ np.swapaxes(a, 1, 2) / d + 0.3 * np.eye(d)
  gamma = skew * rng.normal(size=(k, d))
  return mu, sigma, gamma


# --- the density and the losses ---------------------------------------------


@pytest.mark.parametrize('d', [1, 2, 5, 16])
def test_log_density_matches_numpy_float64(d):
  rng = np.random.default_rng(d)
  mu, sigma, gamma = random_params(rng, 3, d)
  x = rng.normal(size=(7, d)) * 2
  got = slac.skew_laplace_log_density(
      jnp.float32(x), jnp.float32(mu), jnp.float32(sigma), jnp.float32(gamma))
  assert got.shape == (7, 3)
  np.testing.assert_allclose(np.asarray(got), ref_log_density(
      x, mu, sigma, gamma), rtol=2e-4, atol=2e-4)


def test_diagonal_sigma_is_the_diagonal_matrix():
  rng = np.random.default_rng(0)
  mu, _, gamma = random_params(rng, 4, 6)
  var = rng.uniform(0.2, 3.0, size=(4, 6))
  x = rng.normal(size=(5, 6))
  diag = slac.skew_laplace_log_density(x, mu, var, gamma)
  full = jax.vmap(jnp.diag)(jnp.asarray(var))
  np.testing.assert_allclose(np.asarray(diag), ref_log_density(
      x, mu, np.asarray(full), gamma), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_density_integrates_to_one_in_2d(seed):
  rng = np.random.default_rng(100 + seed)
  mu, sigma, gamma = random_params(rng, 1, 2, skew=0.5)
  # A square grid in whitened coordinates: x = mu + L u, dx = |det L| du
  # (L the Cholesky factor of Sigma), so the grid follows Sigma's shape.
  # The density decays like exp(-(alpha - |L^-1 gamma|) |u|) in the slowest
  # direction: the box reaches 25 of those lengths from mu.
  chol = np.linalg.cholesky(sigma[0])
  g = np.linalg.norm(np.linalg.solve(chol, gamma[0]))
  half = 25 / (math.sqrt(1 + g * g) - g)
  h = 0.2
  axis = np.arange(-half, half + h / 2, h)
  gx, gy = np.meshgrid(axis, axis, indexing='ij')
  pts = mu[0] + np.stack([gx.ravel(), gy.ravel()], -1) @ chol.T
  logf = slac.skew_laplace_log_density(
      jnp.float32(pts), jnp.float32(mu), jnp.float32(sigma),
      jnp.float32(gamma))
  total = np.sum(np.exp(np.asarray(logf, np.float64))) * h * h * abs(
      np.linalg.det(chol))
  assert abs(total - 1.0) < 1e-3, total


def test_nll_loss_matches_numpy():
  rng = np.random.default_rng(3)
  log_f = rng.normal(size=(6, 4))
  labels = rng.integers(0, 4, size=6)
  want = -np.mean([log_f[i, labels[i]] for i in range(6)])
  np.testing.assert_allclose(
      float(slac.nll_loss(jnp.float32(log_f), jnp.asarray(labels))), want,
      rtol=1e-6)


def test_ac_loss_diagonal_is_the_diagonal_matrix():
  rng = np.random.default_rng(9)
  mu, _, gamma = random_params(rng, 5, 4)
  inv_var = rng.uniform(0.2, 3.0, size=(5, 4))
  got = slac.ac_loss(jnp.float32(mu), jnp.float32(inv_var),
                     jnp.float32(gamma))
  want = ref_ac_loss(mu, np.stack([np.diag(1 / v) for v in inv_var]), gamma)
  np.testing.assert_allclose(float(got), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('k,d', [(2, 3), (5, 4), (10, 8)])
def test_ac_loss_matches_numpy(k, d):
  rng = np.random.default_rng(k * d)
  mu, sigma, gamma = random_params(rng, k, d)
  got = slac.ac_loss(jnp.float32(mu), jnp.float32(np.linalg.inv(sigma)),
                     jnp.float32(gamma))
  np.testing.assert_allclose(float(got), ref_ac_loss(mu, sigma, gamma),
                             rtol=1e-4, atol=1e-6)


def test_ac_loss_target_carries_no_gradient_and_zero_gamma_is_finite():
  rng = np.random.default_rng(5)
  mu, sigma, gamma = random_params(rng, 4, 3)
  mu, sigma, gamma = (jnp.float32(a) for a in (mu, np.linalg.inv(sigma),
                                                gamma))
  g_mu, g_sigma, g_gamma = jax.grad(slac.ac_loss, argnums=(0, 1, 2))(
      mu, sigma, gamma)
  assert not np.any(np.asarray(g_mu)) and not np.any(np.asarray(g_sigma))
  assert np.any(np.asarray(g_gamma))
  # gamma = 0 (the initial value): the cosine is 0, the loss and gradient
  # finite.
  zero = jnp.zeros_like(gamma)
  value, grad = jax.value_and_grad(slac.ac_loss, argnums=2)(mu, sigma, zero)
  assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize('call,needle', [
    (lambda: slac.skew_laplace_log_density(np.zeros((2, 3)), np.zeros((2, 4)),
                                           np.ones((2, 4)), np.zeros((2, 4))),
     '`x`'),
    (lambda: slac.skew_laplace_log_density(np.zeros((2, 4)), np.zeros((2, 4)),
                                           np.ones((2, 3)), np.zeros((2, 4))),
     '`sigma`'),
    (lambda: slac.skew_laplace_log_density(np.zeros((2, 4)), np.zeros(4),
                                           np.ones(4), np.zeros(4)), '`mu`'),
    (lambda: slac.ac_loss(np.zeros((2, 4)), np.ones((2, 4)), np.zeros((3, 4))),
     '`gamma`'),
    (lambda: slac.ac_loss(np.zeros((1, 4)), np.ones((1, 4)), np.zeros((1, 4))),
     'at least 2'),
    (lambda: slac.nll_loss(np.zeros((2, 4)), np.zeros(3, np.int32)),
     '`labels`'),
    (lambda: slac.nll_loss(np.zeros((2, 4)), np.zeros(2)), 'integers'),
    (lambda: slac.SLACHead(3, covariance='low_rank').init(
        jax.random.key(0), jnp.zeros((1, 2))), '`covariance`'),
    (lambda: slac.SLACHeadNNX(2, 3, rngs=0), '`rngs`'),
])
def test_bad_arguments_are_named(call, needle):
  with pytest.raises(ValueError, match=needle):
    call()


# --- the head ----------------------------------------------------------------


def _random_head_params(key, k, d, covariance):
  k1, k2, k3 = jax.random.split(key, 3)
  shape = (k, d, d) if covariance == 'full' else (k, d)
  return {'mu': jax.random.normal(k1, (k, d)),
          'sigma': 0.3 * jax.random.normal(k2, shape),
          'gamma': 0.5 * jax.random.normal(k3, (k, d))}


@pytest.mark.parametrize('covariance', ['full', 'diagonal'])
def test_head_is_the_density_plus_log_prior(covariance):
  k, d = 4, 5
  head = slac.SLACHead(k, covariance=covariance)
  x = jax.random.normal(jax.random.key(1), (6, d))
  init = head.init(jax.random.key(0), x)['params']
  # The paper's initial values: Sigma = I, gamma = 0.
  factor = slac.precision_factor(init['sigma'], covariance)
  ident = np.eye(d) if covariance == 'full' else np.ones(d)
  np.testing.assert_array_equal(np.asarray(factor), np.broadcast_to(
      ident, factor.shape))
  assert not np.any(np.asarray(init['gamma']))
  params = _random_head_params(jax.random.key(2), k, d, covariance)
  logits, state = head.apply({'params': params}, x,
                             mutable=['intermediates'])
  sown = slac.find_sown(state['intermediates'])
  factor = np.asarray(slac.precision_factor(params['sigma'], covariance),
                      np.float64)
  # Sigma^-1 = P P^T (full) or diag(P^2), P = exp(-R) on the diagonal.
  precision = (factor @ np.swapaxes(factor, 1, 2) if covariance == 'full'
               else np.stack([np.diag(f**2) for f in factor]))
  sigma = np.linalg.inv(precision)
  want = ref_log_density(x, params['mu'], sigma, params['gamma'])
  np.testing.assert_allclose(np.asarray(sown['log_density']), want,
                             rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(np.asarray(logits), want - math.log(k),
                             rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(
      np.asarray(sown['sigma_inv']),
      precision if covariance == 'full' else factor**2, rtol=1e-5, atol=1e-6)
  if covariance == 'diagonal':  # log standard deviations
    np.testing.assert_allclose(np.diagonal(sigma, axis1=1, axis2=2),
                               np.exp(2 * np.asarray(params['sigma'])),
                               rtol=1e-5)
  # Without a mutable collection it sows nothing and gives the same logits.
  np.testing.assert_array_equal(
      np.asarray(head.apply({'params': params}, x)), np.asarray(logits))


@pytest.mark.parametrize('covariance', ['full', 'diagonal'])
def test_linen_and_nnx_heads_agree(covariance):
  k, d = 3, 6
  x = jax.random.normal(jax.random.key(7), (5, d))
  params = _random_head_params(jax.random.key(8), k, d, covariance)
  linen_logits, state = slac.SLACHead(k, covariance=covariance).apply(
      {'params': params}, x, mutable=['intermediates'])
  head = slac.SLACHeadNNX(d, k, covariance=covariance, rngs=nnx.Rngs(0))
  shapes = {n: getattr(head, n).shape for n in params}
  assert shapes == {n: v.shape for n, v in params.items()}
  for name, value in params.items():
    getattr(head, name)[...] = value
  nnx_logits, inter = nnx.capture(head, nnx.Intermediate)(x)
  np.testing.assert_array_equal(np.asarray(nnx_logits),
                                np.asarray(linen_logits))
  a, b = slac.find_sown(state['intermediates']), slac.find_sown(inter)
  for name in a:
    np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))


# --- the zoo ------------------------------------------------------------------


@pytest.mark.parametrize('name,shape,path,sigma', [
    ('lenet5_bn', (2, 28, 28, 1), 'fc3', (10, 84, 84)),
    ('resnet20', (2, 32, 32, 3), 'fc', (10, 64, 64)),
    ('resnet32', (2, 32, 32, 3), 'fc', (10, 64, 64)),
    ('vgg_small', (2, 32, 32, 3), 'fc', (10, 8192)),
])
def test_zoo_models_take_the_slac_head(name, shape, path, sigma):
  model = create_model(name, kind='adder', num_classes=10, head='slac')
  x = jnp.zeros(shape)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), x)
  params = variables['params']
  assert sorted(params[path]) == ['gamma', 'mu', 'sigma']
  assert params[path]['sigma'].shape == sigma
  assert 'fc_bn' not in params  # no BatchNorm on log-densities
  logits, updates = jax.eval_shape(lambda v, x: model.apply(
      v, x, train=True, mutable=['batch_stats', 'intermediates']),
                                   variables, x)
  assert logits.shape == (2, 10)
  assert 'slac' in updates['intermediates'][path]


def test_zoo_default_head_is_unchanged():
  x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
  default = create_model('lenet5_bn', kind='cnn', num_classes=10)
  dense = create_model('lenet5_bn', kind='cnn', num_classes=10,
                       head='dense')
  v = jax.jit(lambda x: default.init(jax.random.key(1), x, train=False))(x)
  v2 = jax.jit(lambda x: dense.init(jax.random.key(1), x, train=False))(x)
  for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(v2), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(
      np.asarray(jax.jit(lambda v: default.apply(v, x, train=False))(v)),
      np.asarray(jax.jit(lambda v: dense.apply(v, x, train=False))(v)))
  with pytest.raises(ValueError, match='`head`'):
    create_model('lenet5_bn', kind='adder', num_classes=10, head='cosine')


def test_zoo_slac_model_runs_and_learns_through_the_losses():
  model = create_model('lenet5_bn', kind='cnn', num_classes=10, head='slac')
  x = jax.random.normal(jax.random.key(0), (8, 28, 28, 1))
  labels = jnp.arange(8) % 10
  v = model.init(jax.random.key(1), x, train=False)

  def loss(params):
    logits, upd = model.apply({'params': params,
                               'batch_stats': v['batch_stats']}, x,
                              train=True,
                              mutable=['batch_stats', 'intermediates'])
    sown = slac.find_sown(upd['intermediates'])
    return (losses.cross_entropy(logits, labels)
            + 0.01 * slac.nll_loss(sown['log_density'], labels)
            + 0.1 * slac.ac_loss(sown['mu'], sown['sigma_inv'],
                                 sown['gamma']))
  value, grads = jax.jit(jax.value_and_grad(loss))(v['params'])
  assert np.isfinite(float(value))
  for name in ('mu', 'sigma', 'gamma'):
    g = np.asarray(grads['fc3'][name])
    assert np.all(np.isfinite(g)) and np.any(g), name


# --- optimizer.lr_scales ------------------------------------------------------


def test_lr_scales_scale_exactly_the_named_parameters_against_sgd_by_hand():
  params = {'fc': {'sigma': jnp.array([1.0, -2.0]), 'mu': jnp.array([0.5])},
            'sigma': {'kernel': jnp.array([3.0])},
            'bn': {'scale': jnp.array([1.0, 1.0])}}
  lr, momentum, factor = 0.1, 0.9, 0.25
  tx = optax.chain(optax.sgd(lr, momentum=momentum),
                   lr_scales.scale_updates(params, f'sigma={factor}'))
  state = tx.init(params)
  grads = [jax.tree.map(lambda p, s=s: p * s + 1.0, params)
           for s in (1.0, -0.5)]
  p = params
  for g in grads:
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
  # By hand: buf = momentum * buf + g, p -= lr * f * buf, f = factor on the
  # leaves with a path component 'sigma', 1 elsewhere.
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, p0 in flat:
    keys = [k.key for k in path]
    f = factor if 'sigma' in keys else 1.0
    buf = np.zeros_like(np.asarray(p0))
    want = np.asarray(p0, np.float64)
    for g in grads:
      gv = np.asarray(g[keys[0]][keys[1]])
      buf = momentum * buf + gv
      want = want - lr * f * buf
    got = np.asarray(p[keys[0]][keys[1]])
    np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=str(keys))


@pytest.mark.parametrize('spec,needle', [
    ('sigma', 'use name=factor'),
    ('sigma=-1', 'finite number >= 0'),
    ('sigma=nan', 'finite number >= 0'),
    ('sigma=0.1,sigma=0.2', 'given twice'),
])
def test_lr_scales_bad_entries_are_named(spec, needle):
  with pytest.raises(ValueError, match=needle):
    lr_scales.parse_lr_scales(spec)


def test_create_optimizer_scales_sigma_only(mnist_dir):
  base = tiny_mnist_config(mnist_dir, kind='adder,slac')
  plain = tiny_mnist_config(mnist_dir, kind='adder,slac',
                            **{'optimizer.lr_scales': ''})
  assert base.optimizer.lr_scales == 'sigma=0.01'
  model = experiment.create_model(base.model, 10)
  example = jnp.zeros((1, 28, 28, 1))
  params = model.init(jax.random.key(0), example, train=False)['params']
  grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
  out = {}
  for name, config in (('scaled', base), ('plain', plain)):
    tx, _ = experiment.create_optimizer(config, model, example, 3)
    out[name], _ = tx.update(grads, tx.init(params), params)
  flat_s = jax.tree_util.tree_flatten_with_path(out['scaled'])[0]
  flat_p = dict(jax.tree_util.tree_flatten_with_path(out['plain'])[0])
  for path, u in flat_s:
    scale = 0.01 if path[-1].key == 'sigma' else 1.0
    np.testing.assert_allclose(np.asarray(u), scale * np.asarray(
        flat_p[path]), rtol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_lr_scales_errors_are_config_errors(mnist_dir):
  bad = tiny_mnist_config(mnist_dir, **{'optimizer.lr_scales': 'sigma'})
  with pytest.raises(errors.ConfigError, match='optimizer.lr_scales entry'):
    experiment.validate_config(bad)
  # A dense head has no 'sigma' parameter: the error names the entry.
  missing = tiny_mnist_config(mnist_dir,
                              **{'optimizer.lr_scales': 'sigma=0.01'})
  with pytest.raises(errors.ConfigError,
                     match=r"optimizer.lr_scales entry 'sigma=0.01'"):
    experiment.Experiment.from_config(missing, data=False)
  # SLAC terms on a dense head.
  terms = tiny_mnist_config(mnist_dir, loss_terms='slac_nll=0.01')
  with pytest.raises(errors.ConfigError, match='head=slac'):
    experiment.validate_config(terms)


# --- the :slac config trains ----------------------------------------------


@pytest.fixture(scope='module')
def mnist_dir(tmp_path_factory):
  return testing.write_synthetic_mnist(
      str(tmp_path_factory.mktemp('mnist')), 64, 40, 0)


def test_slac_token_config_trains_two_steps(mnist_dir):
  config = tiny_mnist_config(mnist_dir, kind='adder,slac', steps_per_epoch=2,
                             tensorboard=False)
  assert config.model.overrides.head == 'slac'
  assert config.loss_terms == 'slac_nll=0.01,slac_ac=0.1'
  exp = experiment.Experiment.from_config(config)
  assert exp.objective.collect_intermediates
  state = jax.tree.map(jnp.asarray, exp.init_host_state())
  step = jax.jit(exp.train_step_fn())
  # No LAPACK call in the step (OpenBLAS's threads deadlocked a CPU run
  # whose step factorised Sigma).
  hlo = step.lower(state, exp.datasets.train.batch(0)).as_text()
  assert 'lapack' not in hlo.lower()
  first = state
  for i in range(2):
    state, metrics = step(state, exp.datasets.train.batch(i))
    for key in ('loss/slac_nll', 'loss/slac_ac'):
      assert np.isfinite(float(metrics[key])), key
  moved = {name: float(jnp.max(jnp.abs(state.params['fc3'][name]
                                       - first.params['fc3'][name])))
           for name in ('mu', 'sigma', 'gamma')}
  assert all(v > 0 for v in moved.values()), moved
  metrics = exp.evaluate(state)
  assert 0 <= metrics['top1'] <= 1 and np.isfinite(metrics['loss'])
