"""Exactness of the adder ops and of whole adder networks (issue 14).

References, all independent of the code under test:

* the numpy float64 oracle of ``adder_oracle`` (paper eq. 2, 3, 5-7) on the
  same float32 inputs, for layers;
* the ``'test_oracle'`` backend of ``jax_oracle`` (the paper's formulas on the
  materialised difference tensor) for whole networks built from the real
  modules, compared in float64 where rounding cannot flip a ReLU or a
  max-pool choice;
* IEEE float32 arithmetic itself for overflow.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import absltest
from absl.testing import parameterized

import adder_oracle as oracle
import jax_oracle
from adderjax import adder_conv
from adderjax import adder_dense
from adderjax import models
from adderjax.ops import geometry
from adderjax.ops import xla_backend
from experiments.reproduce_lib.lenetpp import LeNetPP

ORACLE = jax_oracle.register()
BACKENDS = ('xla', 'pallas_gpu_interpret', 'pallas_tpu_interpret')
MODES = ('full_precision', 'unclipped', 'sign')


def _rel_err(a, ref) -> float:
  a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
  scale = np.max(np.abs(ref))
  return float(np.max(np.abs(a - ref)) / (scale if scale else 1.0))


def _layer(x, w, gy, *, impl, mode='full_precision', **conv_kwargs):
  f = functools.partial(adder_conv, grad=mode, implementation=impl,
                        **conv_kwargs)
  y, vjp = jax.vjp(f, x, w)
  return (y,) + vjp(gy)


# --- whole networks -----------------------------------------------------------


def _loss_fn(model, variables, x, labels):
  def loss(params):
    logits, _ = model.apply({**variables, 'params': params}, x, train=True,
                            mutable=['batch_stats'])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(x.dtype), labels).mean()
  return loss


def _net_grads(build, batch, size, channels, *, impl, dtype, jit):
  model = build(impl, dtype)
  kx, ky = jax.random.split(jax.random.key(batch * 1000 + size))
  x = jax.random.normal(kx, (batch, size, size, channels), dtype)
  labels = jax.random.randint(ky, (batch,), 0, 10)
  variables = model.init(jax.random.key(0), x, train=False)
  variables = jax.tree_util.tree_map(lambda a: a.astype(dtype), variables)
  grad = jax.grad(_loss_fn(model, variables, x, labels))
  return (jax.jit(grad) if jit else grad)(variables['params'])


def _lenetpp(impl, dtype):
  return LeNetPP(kind='adder', implementation=impl, dtype=dtype)


def _zoo(name):
  def build(impl, dtype):
    return models.create_model(name, kind='adder', num_classes=10,
                               dtype=dtype, implementation=impl)
  return build


def _compare_trees(test, got, want, tol, what):
  """Every leaf finite and within ``tol`` of the largest reference gradient.

  The scale is the whole gradient's: a leaf whose true gradient is tiny
  (a BatchNorm bias whose effect the next BatchNorm removes) is all
  rounding, in any backend.
  """
  leaves = jax.tree_util.tree_leaves_with_path(got)
  want_leaves = jax.tree_util.tree_leaves(want)
  test.assertEqual(len(leaves), len(want_leaves))
  scale = max(float(np.max(np.abs(np.asarray(b, np.float64))))
              for b in want_leaves)
  for (path, a), b in zip(leaves, want_leaves):
    name = jax.tree_util.keystr(path)
    a = np.asarray(a, np.float64)
    test.assertTrue(np.isfinite(a).all(), f'{what}: {name} not finite')
    err = float(np.max(np.abs(a - np.asarray(b, np.float64)))) / scale
    test.assertLessEqual(err, tol, f'{what}: {name} error {err} of the '
                         f'gradient scale {scale}')


# The network: 5x5 conv stem + BN + ReLU + pool, AdderConv 3x3 to 16
# and 32 (+ two-pass BN + ReLU + pool), AdderDense to 2 + BN, AdderDense to 10
# + BN. (batch, input size) pairs; 28 is MNIST.
LENETPP_F32 = ((8, 28), (256, 28), (64, 20))
LENETPP_F64 = ((8, 28), (16, 20))
#: More shapes, in ``make test-all`` only (time).
LENETPP_F32_MORE = ((64, 28), (8, 20))
LENETPP_F64_MORE = ((32, 28), (8, 20))


class NetworkGradientTest(parameterized.TestCase):
  """Finite gradients under jit, equal to eager and to other backends."""

  @parameterized.parameters(*LENETPP_F32)
  def test_lenetpp_jit_equals_eager_float32(self, batch, size):
    args = (_lenetpp, batch, size, 1)
    jitted = _net_grads(*args, impl=None, dtype=jnp.float32, jit=True)
    eager = _net_grads(*args, impl=None, dtype=jnp.float32, jit=False)
    _compare_trees(self, jitted, eager, 1e-4, f'jit vs eager b{batch} {size}')

  @parameterized.parameters(*LENETPP_F32_MORE)
  @pytest.mark.slow
  def test_lenetpp_jit_equals_eager_float32_more_shapes(self, batch, size):
    self.test_lenetpp_jit_equals_eager_float32(batch, size)

  @parameterized.parameters(*LENETPP_F64_MORE)
  @pytest.mark.slow
  def test_lenetpp_matches_oracle_backend_float64_more_shapes(self, batch,
                                                              size):
    self.test_lenetpp_matches_oracle_backend_float64(batch, size)

  @parameterized.parameters(*LENETPP_F64)
  def test_lenetpp_matches_oracle_backend_float64(self, batch, size):
    with jax.enable_x64(True):
      args = (_lenetpp, batch, size, 1)
      want = _net_grads(*args, impl=ORACLE, dtype=jnp.float64, jit=True)
      got = _net_grads(*args, impl='xla', dtype=jnp.float64, jit=True)
      _compare_trees(self, got, want, 1e-9, 'xla vs oracle (jit)')
      if batch == 8:
        eager = _net_grads(*args, impl='xla', dtype=jnp.float64, jit=False)
        _compare_trees(self, eager, want, 1e-9, 'xla vs oracle (eager)')

  # Batches 8 and 24 take the TPU kernels' small-batch path (row strips in
  # the lanes, windows read with the channels on the lanes and transposed in
  # VMEM; 24 images leave lanes 120-127 empty); batch 128 (one full lane
  # block) the in-place path with its copied row windows. (The HBM row
  # strips of batches that are not a multiple of 8 are checked per layer in
  # tests/test_pallas_conv.py.)
  @parameterized.parameters(('pallas_gpu_interpret', 8),
                            ('pallas_tpu_interpret', 8),
                            ('pallas_tpu_interpret', 24),
                            ('pallas_tpu_interpret', 128))
  def test_lenetpp_pallas_interpret_matches_xla_float32(self, backend, batch):
    args = (_lenetpp, batch, 28, 1)
    want = _net_grads(*args, impl='xla', dtype=jnp.float32, jit=True)
    got = _net_grads(*args, impl=backend, dtype=jnp.float32, jit=True)
    _compare_trees(self, got, want, 1e-4, f'{backend} vs xla b{batch}')


# (model, channels, [(batch, size), ...]) for the float64 oracle comparison.
ZOO_F64 = (
    ('lenet5_bn', 1, ((4, 28), (2, 32))),
    ('vgg_small', 3, ((2, 32),)),
    ('resnet20', 3, ((2, 16), (4, 8))),
    ('resnet32', 3, ((2, 8),)),
    # The ImageNet ResNets at 64 px: their last stage (2x2) still gives each
    # BatchNorm 8 values per channel (at 32 px, 2: an ill-conditioned step
    # whose gradients are rounding in any backend).
    ('resnet18', 3, ((2, 64),)),
    ('resnet50', 3, ((2, 64),)),
)


#: Kept out of the default suite for time (minutes each on 2 cores):
#: ResNet-32 is ResNet-20 with more blocks; ResNet-50's eager run is slow and
#: its float64 oracle run 2.5 minutes; ResNet-18's oracle run (1.5 minutes)
#: adds the ImageNet stem, which is full precision, to ResNet-20's basic
#: blocks, stride-2 and 1x1 downsampling adder layers; its jit-vs-eager
#: repeats ResNet-20's blocks. The default suite compares the oracle at the
#: first (batch, size) case only; ``make test-all`` runs all.
SLOW_ORACLE = ('resnet18', 'resnet32', 'resnet50')
SLOW_EAGER = ('resnet18', 'resnet32', 'resnet50')


def _zoo_params(slow):
  return [pytest.param(name, ch, cases, id=name,
                       marks=[pytest.mark.slow] if name in slow else [])
          for name, ch, cases in ZOO_F64]


class _Asserts(absltest.TestCase):
  """assert* methods for the pytest-style functions below."""

  def runTest(self):  # pylint: disable=invalid-name
    pass


@pytest.mark.parametrize('name,ch,cases', _zoo_params(SLOW_ORACLE))
def test_adder_zoo_matches_oracle_backend_float64(name, ch, cases):
  with jax.enable_x64(True):
    for batch, size in cases[:1]:
      args = (_zoo(name), batch, size, ch)
      want = _net_grads(*args, impl=ORACLE, dtype=jnp.float64, jit=True)
      got = _net_grads(*args, impl='xla', dtype=jnp.float64, jit=True)
      _compare_trees(_Asserts(), got, want, 1e-9, f'{name} b{batch} {size}')


@pytest.mark.slow
@pytest.mark.parametrize('name,ch,cases', [c for c in _zoo_params(()) if
                                           len(c.values[2]) > 1])
def test_adder_zoo_matches_oracle_backend_float64_more_shapes(name, ch,
                                                              cases):
  with jax.enable_x64(True):
    for batch, size in cases[1:]:
      args = (_zoo(name), batch, size, ch)
      want = _net_grads(*args, impl=ORACLE, dtype=jnp.float64, jit=True)
      got = _net_grads(*args, impl='xla', dtype=jnp.float64, jit=True)
      _compare_trees(_Asserts(), got, want, 1e-9, f'{name} b{batch} {size}')


@pytest.mark.parametrize('name,ch,cases', _zoo_params(SLOW_EAGER))
def test_adder_zoo_jit_equals_eager_float32(name, ch, cases):
  batch, size = cases[0]
  args = (_zoo(name), batch, size, ch)
  jitted = _net_grads(*args, impl=None, dtype=jnp.float32, jit=True)
  eager = _net_grads(*args, impl=None, dtype=jnp.float32, jit=False)
  _compare_trees(_Asserts(), jitted, eager, 1e-4, f'{name} jit vs eager')


# --- layers far from zero -----------------------------------------------------

# (x_shape, kernel_shape, conv kwargs, numpy (strides, pads, dilation, groups))
LAYERS = {
    '3x3_same_c64': ((2, 5, 5, 64), (3, 3, 64, 8), dict(padding='SAME'),
                     ((1, 1), [(1, 1), (1, 1)], (1, 1), 1)),
    '3x3_stride2_valid': ((2, 8, 8, 4), (3, 3, 4, 6),
                          dict(strides=2, padding='VALID'),
                          ((2, 2), [(0, 0), (0, 0)], (1, 1), 1)),
    '1x1_stride2': ((2, 6, 6, 16), (1, 1, 16, 8),
                    dict(strides=2, padding='VALID'),
                    ((2, 2), [(0, 0), (0, 0)], (1, 1), 1)),
    'groups_pad': ((2, 6, 6, 8), (3, 3, 4, 6),
                   dict(padding=1, feature_group_count=2),
                   ((1, 1), [(1, 1), (1, 1)], (1, 1), 2)),
}


def _oracle(x, w, gy, geo_args, mode):
  s, pads, d, groups = geo_args
  y = oracle.forward(x, w, s, pads, d, groups)
  dx, dw = oracle.grads(x, w, gy, s, pads, d, groups, mode)
  return y, dx, dw


class OffsetTest(parameterized.TestCase):
  """Within 1e-5 of the output scale at offsets up to 1e6, every backend."""

  @parameterized.product(backend=BACKENDS, offset=(0.0, 1e3, 1e4, 1e6),
                         layer=tuple(LAYERS), mode=MODES)
  def test_forward_and_grads_far_from_zero(self, backend, offset, layer,
                                           mode):
    x_shape, k_shape, kwargs, geo_args = LAYERS[layer]
    rng = np.random.default_rng(7)
    x = (rng.uniform(size=x_shape) + offset).astype(np.float32)
    w = (rng.uniform(size=k_shape) + offset).astype(np.float32)
    y = oracle.forward(x, w, *geo_args)
    gy = rng.normal(size=y.shape).astype(np.float32)
    got = _layer(x, w, gy, impl=backend, mode=mode, **kwargs)
    want = _oracle(x, w, gy, geo_args, mode)
    for name, a, b in zip(('y', 'dx', 'dw'), got, want):
      err = _rel_err(a, b)
      self.assertLessEqual(err, 1e-5, f'{name}: {err}')

  @parameterized.parameters(*BACKENDS)
  def test_dense_far_from_zero(self, backend):
    rng = np.random.default_rng(3)
    x = (rng.uniform(size=(5, 64)) + 1e6).astype(np.float32)
    w = (rng.uniform(size=(64, 7)) + 1e6).astype(np.float32)
    want = -np.abs(x.astype(np.float64)[:, :, None] - w[None]).sum(1)
    got = adder_dense(x, w, implementation=backend)
    self.assertLessEqual(_rel_err(got, want), 1e-5)


class OverflowTest(parameterized.TestCase):
  """float32 arithmetic: exact where representable, -inf beyond, no NaN."""

  @parameterized.product(backend=BACKENDS,
                         value=(1e37, 2e37, 1e38, 3e38, -1e37, -3e38))
  def test_large_inputs(self, backend, value):
    rng = np.random.default_rng(0)
    x = np.full((1, 3, 3, 2), value, np.float32)  # 18 terms of |value - w|
    w = rng.uniform(size=(3, 3, 2, 3)).astype(np.float32)
    y = np.asarray(adder_conv(x, w, padding='VALID',
                              implementation=backend))
    exact = oracle.forward(x, w, (1, 1), [(0, 0), (0, 0)], (1, 1), 1)
    with np.errstate(over='ignore'):
      want = exact.astype(np.float32)  # -inf where it does not fit
    self.assertFalse(np.isnan(y).any())
    np.testing.assert_array_equal(np.isinf(y), np.isinf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(y[finite], want[finite], rtol=1e-6)

  def test_representable_result_is_finite(self):
    x = np.full((1, 3, 3, 2), 1e37, np.float32)
    w = np.zeros((3, 3, 2, 1), np.float32)
    self.assertAlmostEqual(
        float(adder_conv(x, w, padding='VALID')[0, 0, 0, 0]) / -1.8e38, 1.0,
        places=6)


# --- non-finite values stay in their receptive field ---------------------------

NAN_LAYERS = {
    '3x3_same': ((2, 7, 7, 2), (3, 3, 2, 3), dict(padding='SAME'),
                 ((1, 1), [(1, 1), (1, 1)], (1, 1), 1)),
    # 8 = 2 * 3 + 2: the last row and column are read by no output.
    '3x3_stride2_valid': ((2, 8, 8, 2), (3, 3, 2, 3),
                          dict(strides=2, padding='VALID'),
                          ((2, 2), [(0, 0), (0, 0)], (1, 1), 1)),
    '1x1_stride2': ((2, 7, 7, 2), (1, 1, 2, 3),
                    dict(strides=2, padding='VALID'),
                    ((2, 2), [(0, 0), (0, 0)], (1, 1), 1)),
}


def _isnan_pattern_test(test, x, w, gy, kwargs, geo_args, backend, mode):
  got = _layer(x, w, gy, impl=backend, mode=mode, **kwargs)
  with np.errstate(invalid='ignore'):
    want = _oracle(x, w, gy, geo_args, mode)
  for name, a, b in zip(('y', 'dx', 'dw'), got, want):
    a = np.asarray(a)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=name)
    ok = np.isfinite(b)
    np.testing.assert_allclose(a[ok], b[ok], rtol=1e-5, atol=1e-4,
                               err_msg=name)


class NanLocalityTest(parameterized.TestCase):

  @parameterized.product(backend=BACKENDS, layer=tuple(NAN_LAYERS),
                         where=('corner', 'centre'),
                         mode=('full_precision', 'sign'))
  def test_nan_cotangent(self, backend, layer, where, mode):
    x_shape, k_shape, kwargs, geo_args = NAN_LAYERS[layer]
    rng = np.random.default_rng(1)
    x = rng.normal(size=x_shape).astype(np.float32)
    w = rng.normal(size=k_shape).astype(np.float32)
    y = oracle.forward(x, w, *geo_args)
    gy = rng.normal(size=y.shape).astype(np.float32)
    pos = (0, 0, 0, 0) if where == 'corner' else (
        0, y.shape[1] // 2, y.shape[2] // 2, 0)
    gy[pos] = np.nan
    _isnan_pattern_test(self, x, w, gy, kwargs, geo_args, backend, mode)

  @parameterized.product(backend=BACKENDS, layer=tuple(NAN_LAYERS),
                         where=('centre', 'unread'))
  def test_nan_input(self, backend, layer, where):
    x_shape, k_shape, kwargs, geo_args = NAN_LAYERS[layer]
    rng = np.random.default_rng(2)
    x = rng.normal(size=x_shape).astype(np.float32)
    w = rng.normal(size=k_shape).astype(np.float32)
    if where == 'unread':
      if layer == '3x3_same':
        self.skipTest('every input position is read')
      x[1, -1, -1, 0] = np.nan  # last row/column: no window reaches it
    else:
      x[1, 3, 3, 1] = np.nan
    y = oracle.forward(x, w, *geo_args)
    gy = rng.normal(size=np.shape(y)).astype(np.float32)
    _isnan_pattern_test(self, x, w, gy, kwargs, geo_args, backend,
                        'full_precision')

  @parameterized.parameters('corner', 'centre', 'unread')
  def test_tiled_xla_input_grad(self, where):
    # Batch tiles of one example (lax.map) in the XLA input gradient.
    x_shape, k_shape, kwargs, geo_args = NAN_LAYERS['3x3_stride2_valid']
    x_shape = (4,) + x_shape[1:]
    rng = np.random.default_rng(4)
    x = rng.normal(size=x_shape).astype(np.float32)
    w = rng.normal(size=k_shape).astype(np.float32)
    y = oracle.forward(x, w, *geo_args)
    gy = rng.normal(size=y.shape).astype(np.float32)
    if where == 'corner':
      gy[2, 0, 0, 0] = np.nan
    elif where == 'centre':
      gy[2, 1, 1, 1] = np.nan
    else:
      x[2, -1, 3, 0] = np.nan
    geo = geometry.make_geometry(x.shape, w.shape, 2, 'VALID', 1, 1)
    dx = xla_backend.conv_input_grad(jnp.asarray(x), jnp.asarray(w),
                                     jnp.asarray(gy), geo, 'full_precision',
                                     tile_bytes=1)
    with np.errstate(invalid='ignore'):
      _, want_dx, _ = _oracle(x, w, gy, geo_args, 'full_precision')
    np.testing.assert_array_equal(np.isnan(dx), np.isnan(want_dx))
    ok = np.isfinite(want_dx)
    np.testing.assert_allclose(np.asarray(dx)[ok], want_dx[ok], rtol=1e-5,
                               atol=1e-4)


# --- empty batches --------------------------------------------------------------


class EmptyBatchTest(parameterized.TestCase):

  @parameterized.parameters(*BACKENDS)
  def test_op(self, backend):
    x = jnp.ones((0, 5, 5, 2))
    w = jnp.ones((3, 3, 2, 4))
    y, dx, dw = _layer(x, w, jnp.ones((0, 5, 5, 4)), impl=backend)
    self.assertEqual(y.shape, (0, 5, 5, 4))
    self.assertEqual(dx.shape, x.shape)
    np.testing.assert_array_equal(dw, np.zeros(w.shape))  # empty sum
    self.assertEqual(adder_dense(jnp.ones((0, 3)), jnp.ones((3, 2)),
                                 implementation=backend).shape, (0, 2))

  def test_modules_match_flax(self):
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from adderjax import linen as adder_linen  # pylint: disable=g-import-not-at-top
    from adderjax import nnx as adder_nnx  # pylint: disable=g-import-not-at-top
    x = jnp.ones((0, 6, 6, 3))
    for ours, theirs in ((adder_linen.AdderConv(4, (3, 3)),
                          nn.Conv(4, (3, 3))),
                         (adder_linen.AdderDense(5), nn.Dense(5))):
      want = theirs.apply(theirs.init(jax.random.key(0), x), x)
      v = ours.init(jax.random.key(0), x)
      self.assertEqual(ours.apply(v, x).shape, want.shape)
    conv = adder_nnx.AdderConv(3, 4, (3, 3), rngs=nnx.Rngs(0))
    self.assertEqual(conv(x).shape,
                     nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))(x).shape)
    dense = adder_nnx.AdderDense(3, 2, rngs=nnx.Rngs(0))
    self.assertEqual(dense(x).shape, (0, 6, 6, 2))


if __name__ == '__main__':
  absltest.main()
