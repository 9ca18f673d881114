"""Flax Linen / NNX adder layers: drop-in compatibility with Conv / Dense."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from flax import nnx

import adder_oracle as oracle
from adderjax import linen as alinen
from adderjax import nnx as annx

CONV_ARGS = [
    dict(features=4, kernel_size=(3, 3)),
    dict(features=4, kernel_size=(3, 3), strides=2, padding='VALID'),
    dict(features=6, kernel_size=(3, 2), strides=(2, 1), padding=[(1, 2), (0, 1)]),
    dict(features=4, kernel_size=(3, 3), padding=2, kernel_dilation=2),
    dict(features=6, kernel_size=(3, 3), feature_group_count=2),
    dict(features=4, kernel_size=(3, 3), padding='CIRCULAR'),
    dict(features=4, kernel_size=(3, 3), padding='REFLECT', use_bias=False),
    dict(features=4, kernel_size=(3,), padding='CAUSAL'),
    dict(features=4, kernel_size=3, strides=2),
    dict(features=3, kernel_size=(2, 2, 2), padding='SAME'),
]


def _input_for(kwargs, batch=(2,)):
  ks = kwargs['kernel_size']
  nsp = 1 if isinstance(ks, int) else len(ks)
  return jnp.asarray(np.random.default_rng(0).normal(
      size=batch + (7,) * nsp + (4,)), jnp.float32)


class LinenConvTest(parameterized.TestCase):

  @parameterized.parameters(*CONV_ARGS)
  def test_same_shapes_as_flax_conv(self, **kwargs):
    x = _input_for(kwargs)
    conv = nn.Conv(**kwargs)
    adder = alinen.AdderConv(**kwargs)
    cvars = conv.init(jax.random.key(0), x)
    avars = adder.init(jax.random.key(0), x)
    chex_shapes = jax.tree.map(jnp.shape, cvars)
    self.assertEqual(chex_shapes, jax.tree.map(jnp.shape, avars))
    self.assertEqual(conv.apply(cvars, x).shape, adder.apply(avars, x).shape)

  def test_output_is_oracle_plus_bias(self):
    x = _input_for({'kernel_size': (3, 3)})
    layer = alinen.AdderConv(5, (3, 3), strides=2, padding=1,
                             bias_init=nn.initializers.ones)
    variables = layer.init(jax.random.key(1), x)
    y = layer.apply(variables, x)
    k = np.asarray(variables['params']['kernel'])
    expected = oracle.forward(np.asarray(x), k, (2, 2), [(1, 1)] * 2, (1, 1),
                              1) + 1.0
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-4)

  def test_kernel_init_is_standard_normal(self):
    layer = alinen.AdderConv(64, (3, 3))
    k = layer.init(jax.random.key(0), jnp.ones((1, 8, 8, 64)))['params']['kernel']
    self.assertAlmostEqual(float(jnp.std(k)), 1.0, delta=0.03)
    self.assertAlmostEqual(float(jnp.mean(k)), 0.0, delta=0.03)

  def test_batch_dims_flatten_and_unbatched(self):
    layer = alinen.AdderConv(3, (3, 3))
    x = _input_for({'kernel_size': (3, 3)}, batch=(2, 3))
    variables = layer.init(jax.random.key(0), x)
    y = layer.apply(variables, x)
    self.assertEqual(y.shape, (2, 3, 7, 7, 3))
    np.testing.assert_allclose(y[1, 2], layer.apply(variables, x[1, 2]),
                               rtol=1e-6)

  def test_dtype_and_param_dtype(self):
    layer = alinen.AdderConv(3, (3, 3), dtype=jnp.bfloat16)
    x = jnp.ones((1, 5, 5, 2))
    variables = layer.init(jax.random.key(0), x)
    self.assertEqual(variables['params']['kernel'].dtype, jnp.float32)
    self.assertEqual(layer.apply(variables, x).dtype, jnp.bfloat16)

  def test_grad_mode_passed_through(self):
    x = _input_for({'kernel_size': (3, 3)})
    grads = {}
    for mode in ('full_precision', 'sign'):
      layer = alinen.AdderConv(2, (3, 3), use_bias=False, grad=mode)
      variables = layer.init(jax.random.key(0), x)
      grads[mode] = jax.grad(lambda v: layer.apply(v, x).sum())(variables)
    k = np.asarray(variables['params']['kernel'])
    _, edw = oracle.grads(np.asarray(x), k, np.ones((2, 7, 7, 2)), (1, 1),
                          [(1, 1)] * 2, (1, 1), 1, 'sign')
    np.testing.assert_allclose(grads['sign']['params']['kernel'], edw,
                               rtol=1e-5, atol=1e-4)
    self.assertFalse(np.allclose(grads['sign']['params']['kernel'],
                                 grads['full_precision']['params']['kernel']))

  def test_bad_group_count(self):
    with self.assertRaisesRegex(ValueError, 'feature_group_count=3'):
      alinen.AdderConv(6, (3, 3), feature_group_count=3).init(
          jax.random.key(0), jnp.ones((1, 5, 5, 4)))

  def test_causal_needs_1d(self):
    with self.assertRaisesRegex(ValueError, 'CAUSAL'):
      alinen.AdderConv(2, (3, 3), padding='CAUSAL').init(
          jax.random.key(0), jnp.ones((1, 5, 5, 2)))

  def test_input_dilation_rejected(self):
    with self.assertRaisesRegex(ValueError, 'input_dilation=2'):
      alinen.AdderConv(2, (3, 3), input_dilation=2).init(
          jax.random.key(0), jnp.ones((1, 5, 5, 2)))


class LinenDenseTest(parameterized.TestCase):

  def test_same_params_as_dense_and_oracle(self):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5)),
                    jnp.float32)
    dvars = nn.Dense(4).init(jax.random.key(0), x)
    avars = alinen.AdderDense(4).init(jax.random.key(0), x)
    self.assertEqual(jax.tree.map(jnp.shape, dvars),
                     jax.tree.map(jnp.shape, avars))
    y = alinen.AdderDense(4).apply(avars, x)
    k = np.asarray(avars['params']['kernel'])
    np.testing.assert_allclose(
        y, -np.abs(np.asarray(x)[..., :, None] - k).sum(-2), rtol=1e-5,
        atol=1e-5)


class NNXTest(parameterized.TestCase):

  @parameterized.parameters(*CONV_ARGS)
  def test_nnx_matches_linen_and_nnx_conv_shapes(self, **kwargs):
    x = _input_for(kwargs)
    lin = alinen.AdderConv(**kwargs)
    variables = lin.init(jax.random.key(0), x)
    nkw = dict(kwargs)
    features = nkw.pop('features')
    ks = nkw.pop('kernel_size')
    strides = nkw.pop('strides', 1)
    layer = annx.AdderConv(4, features, ks, strides, rngs=nnx.Rngs(0), **nkw)
    ref = nnx.Conv(4, features, ks, strides, rngs=nnx.Rngs(0), **nkw)
    self.assertEqual(layer.kernel.shape, ref.kernel.shape)
    self.assertEqual(layer.bias is None, ref.bias is None)
    # Copy the Linen parameters across: identical outputs.
    layer.kernel[...] = variables['params']['kernel']
    if 'bias' in variables['params']:
      layer.bias[...] = variables['params']['bias'] + 0.5
      variables = jax.tree.map(lambda v: v, variables)
      variables['params']['bias'] = variables['params']['bias'] + 0.5
    np.testing.assert_array_equal(layer(x), lin.apply(variables, x))
    self.assertEqual(layer(x).shape, ref(x).shape)

  def test_nnx_dense_matches_linen(self):
    x = jnp.ones((3, 5)) * jnp.arange(5.0)
    lin = alinen.AdderDense(4)
    variables = lin.init(jax.random.key(0), x)
    layer = annx.AdderDense(5, 4, rngs=nnx.Rngs(0))
    ref = nnx.Linear(5, 4, rngs=nnx.Rngs(0))
    self.assertEqual(layer.kernel.shape, ref.kernel.shape)
    layer.kernel[...] = variables['params']['kernel']
    np.testing.assert_array_equal(layer(x), lin.apply(variables, x))

  def test_nnx_grad_through_module(self):
    layer = annx.AdderConv(2, 3, (3, 3), use_bias=False, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 5, 2)),
                    jnp.float32)
    grads = nnx.grad(lambda m: m(x).sum())(layer)
    _, edw = oracle.grads(np.asarray(x), np.asarray(layer.kernel[...]),
                          np.ones((2, 5, 5, 3)), (1, 1), [(1, 1)] * 2,
                          (1, 1), 1, 'full_precision')
    np.testing.assert_allclose(grads.kernel[...], edw, rtol=1e-5, atol=1e-4)
