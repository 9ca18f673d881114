"""Binary layers: forward against a numpy oracle, STE gradients against their
formulas (DoReFa-Net / XNOR-Net definitions, written out in numpy here)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adderjax import bnn

# ----------------------------------------------------------------------------
# numpy oracle


def np_binarize_x(x, mode):
  if mode == 'sign':
    return np.where(x >= 0, 1.0, -1.0)
  if mode == 'dorefa':
    return np.where(x >= 0.5, 1.0, 0.0)
  return x


def np_ste_mask(x, mode):
  if mode == 'sign':
    return (np.abs(x) <= 1).astype(np.float64)
  if mode == 'dorefa':
    return ((x >= 0) & (x <= 1)).astype(np.float64)
  return np.ones_like(x)


def np_binarize_w(w, scale):
  if scale == 'channel':
    alpha = np.abs(w).reshape(-1, w.shape[-1]).mean(axis=0)
  elif scale == 'layer':
    alpha = np.abs(w).mean()
  else:
    alpha = 1.0
  return np.where(w >= 0, 1.0, -1.0) * alpha


def np_conv2d(x, w, stride, pads, groups):
  """Direct cross-correlation, NHWC x HWIO, explicit (lo, hi) zero pads."""
  n, h, wd, c = x.shape
  kh, kw, cg, t = w.shape
  xp = np.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
  ho = (xp.shape[1] - kh) // stride + 1
  wo = (xp.shape[2] - kw) // stride + 1
  tg = t // groups
  y = np.zeros((n, ho, wo, t))
  for b in range(n):
    for i in range(ho):
      for j in range(wo):
        patch = xp[b, i * stride:i * stride + kh, j * stride:j * stride + kw]
        for o in range(t):
          g = o // tg
          y[b, i, j, o] = np.sum(patch[:, :, g * cg:(g + 1) * cg] * w[..., o])
  return y


def np_conv2d_grads(x, w, gy, stride, pads, groups):
  """Gradients of sum(gy * conv(x, w)) with respect to x and w (direct)."""
  kh, kw, cg, t = w.shape
  xp = np.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
  dxp = np.zeros_like(xp)
  dw = np.zeros_like(w)
  tg = t // groups
  n, ho, wo, _ = gy.shape
  for b in range(n):
    for i in range(ho):
      for j in range(wo):
        sl = (b, slice(i * stride, i * stride + kh),
              slice(j * stride, j * stride + kw))
        for o in range(t):
          g = o // tg
          cs = slice(g * cg, (g + 1) * cg)
          dw[..., o] += gy[b, i, j, o] * xp[sl][:, :, cs]
          dxp[sl + (cs,)] += gy[b, i, j, o] * w[..., o]
  h, wd = x.shape[1:3]
  dx = dxp[:, pads[0][0]:pads[0][0] + h, pads[1][0]:pads[1][0] + wd]
  return dx, dw


def _same_pads(size, k, s):
  out = -(-size // s)
  total = max((out - 1) * s + k - size, 0)
  return (total // 2, total - total // 2)


RNG = np.random.default_rng(0)


def randn(*shape):
  return RNG.standard_normal(shape).astype(np.float32)


# ----------------------------------------------------------------------------
# quantisers


def test_binarize_activations_sign_values_and_ste():
  x = jnp.array([-3., -1., -0.25, 0., 0.5, 1., 1.5])
  np.testing.assert_array_equal(bnn.binarize_activations(x, 'sign'),
                                [-1, -1, -1, 1, 1, 1, 1])
  g = jax.grad(lambda v: jnp.sum(bnn.binarize_activations(v, 'sign')
                                 * jnp.arange(7.)))(x)
  np.testing.assert_array_equal(g, np.arange(7.) * np_ste_mask(np.asarray(x),
                                                               'sign'))


def test_binarize_activations_dorefa_values_and_ste():
  x = jnp.array([-0.5, 0., 0.25, 0.5, 0.75, 1., 2.])
  np.testing.assert_array_equal(bnn.binarize_activations(x, 'dorefa'),
                                [0, 0, 0, 1, 1, 1, 1])
  g = jax.grad(lambda v: jnp.sum(bnn.binarize_activations(v, 'dorefa')
                                 * jnp.arange(1., 8.)))(x)
  np.testing.assert_array_equal(g, [0, 2, 3, 4, 5, 6, 0])


def test_binarize_activations_keeps_dtype_and_none_is_identity():
  x = jnp.array([0.3, -2.], jnp.bfloat16)
  assert bnn.binarize_activations(x, 'sign').dtype == jnp.bfloat16
  np.testing.assert_array_equal(bnn.binarize_activations(x, 'none'), x)


@pytest.mark.parametrize('scale', bnn.WEIGHT_SCALES)
def test_binarize_kernel_forward_and_identity_ste(scale):
  w = randn(3, 3, 4, 5)
  w[0, 0, 0, 0] = 0.0  # sgn(0) = +1
  wb = bnn.binarize_kernel(jnp.asarray(w), scale)
  np.testing.assert_allclose(wb, np_binarize_w(w, scale), rtol=1e-6)
  c = randn(*w.shape)
  g = jax.grad(lambda v: jnp.sum(bnn.binarize_kernel(v, scale) * c))(
      jnp.asarray(w))
  np.testing.assert_allclose(g, c, rtol=1e-6)  # STE: dL/dW = dL/dW_b


def test_bad_modes_raise():
  with pytest.raises(ValueError, match="'xnor'"):
    bnn.binarize_activations(jnp.ones(3), 'xnor')
  with pytest.raises(ValueError, match="'filter'"):
    bnn.binarize_kernel(jnp.ones((2, 2)), 'filter')
  with pytest.raises(TypeError, match='int32'):
    bnn.binarize_activations(jnp.ones(3, jnp.int32))
  layer = bnn.BinaryConv(2, (3, 3), input_binarization='ternary')
  with pytest.raises(ValueError, match="'ternary'"):
    layer.init(jax.random.key(0), jnp.ones((1, 4, 4, 1)))
  layer = bnn.BinaryConv(2, (3, 3), input_dilation=2)
  with pytest.raises(ValueError, match='input_dilation'):
    layer.init(jax.random.key(0), jnp.ones((1, 4, 4, 1)))


# ----------------------------------------------------------------------------
# BinaryConv / BinaryDense


CONV_CASES = [
    # (mode, scale, padding, stride, groups)
    ('sign', 'channel', 'SAME', 1, 1),
    ('sign', 'layer', 'VALID', 2, 1),
    ('dorefa', 'channel', 1, 1, 2),
    ('none', 'none', ((2, 0), (1, 1)), 2, 1),
    ('dorefa', 'layer', 'SAME', 2, 2),
]


def _conv_pads(padding, h, w, k, s):
  if padding == 'SAME':
    return _same_pads(h, k, s), _same_pads(w, k, s)
  if padding == 'VALID':
    return (0, 0), (0, 0)
  if isinstance(padding, int):
    return (padding, padding), (padding, padding)
  return tuple(tuple(p) for p in padding)


@pytest.mark.parametrize('mode,scale,padding,stride,groups', CONV_CASES)
def test_binary_conv_forward_matches_numpy(mode, scale, padding, stride,
                                           groups):
  x = randn(2, 7, 6, 4) * 1.5
  layer = bnn.BinaryConv(6, (3, 3), strides=stride, padding=padding,
                         feature_group_count=groups, use_bias=True,
                         input_binarization=mode, weight_scale=scale)
  w = randn(3, 3, 4 // groups, 6)
  b = randn(6)
  variables = {'params': {'kernel': jnp.asarray(w), 'bias': jnp.asarray(b)}}
  y = layer.apply(variables, jnp.asarray(x))
  pads = _conv_pads(padding, 7, 6, 3, stride)
  expect = np_conv2d(np_binarize_x(x, mode), np_binarize_w(w, scale), stride,
                     pads, groups) + b
  assert y.shape == expect.shape
  np.testing.assert_allclose(y, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('mode,scale,padding,stride,groups', CONV_CASES[:4])
def test_binary_conv_ste_gradients_match_formula(mode, scale, padding, stride,
                                                 groups):
  """dL/dx = (dL/dx_b) * 1[STE window], dL/dW = dL/dW_b (identity STE)."""
  x = randn(2, 6, 5, 4)
  layer = bnn.BinaryConv(4, (3, 3), strides=stride, padding=padding,
                         feature_group_count=groups, use_bias=False,
                         input_binarization=mode, weight_scale=scale)
  w = randn(3, 3, 4 // groups, 4)
  y = layer.apply({'params': {'kernel': jnp.asarray(w)}}, jnp.asarray(x))
  gy = randn(*y.shape)

  def loss(x, w):
    return jnp.sum(layer.apply({'params': {'kernel': w}}, x) * gy)

  dx, dw = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
  pads = _conv_pads(padding, 6, 5, 3, stride)
  dxb, dwb = np_conv2d_grads(np_binarize_x(x, mode), np_binarize_w(w, scale),
                             gy, stride, pads, groups)
  np.testing.assert_allclose(dx, dxb * np_ste_mask(x, mode), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(dw, dwb, rtol=1e-5, atol=1e-5)


def test_binary_conv_circular_padding_and_batch_dims():
  x = randn(2, 3, 5, 5, 2)
  layer = bnn.BinaryConv(3, (3, 3), padding='CIRCULAR', use_bias=False)
  w = randn(3, 3, 2, 3)
  y = layer.apply({'params': {'kernel': jnp.asarray(w)}}, jnp.asarray(x))
  assert y.shape == (2, 3, 5, 5, 3)
  xw = np.pad(np_binarize_x(x.reshape(6, 5, 5, 2), 'sign'),
              [(0, 0), (1, 1), (1, 1), (0, 0)], mode='wrap')
  expect = np_conv2d(xw, np_binarize_w(w, 'channel'), 1, ((0, 0), (0, 0)), 1)
  np.testing.assert_allclose(y.reshape(6, 5, 5, 3), expect, rtol=1e-5,
                             atol=1e-5)


def test_binary_conv_1d():
  x = randn(2, 9, 3)
  layer = bnn.BinaryConv(2, 3, padding='VALID', use_bias=False)
  w = randn(3, 3, 2)
  y = layer.apply({'params': {'kernel': jnp.asarray(w)}}, jnp.asarray(x))
  xb, wb = np_binarize_x(x, 'sign'), np_binarize_w(w, 'channel')
  expect = np.stack([np.einsum('nkc,kct->nt', xb[:, i:i + 3], wb)
                     for i in range(7)], axis=1)
  np.testing.assert_allclose(y, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('mode,scale', [('sign', 'channel'),
                                        ('dorefa', 'layer'),
                                        ('none', 'none')])
def test_binary_dense_forward_and_gradients(mode, scale):
  x = randn(3, 7)
  layer = bnn.BinaryDense(5, input_binarization=mode, weight_scale=scale)
  w, b = randn(7, 5), randn(5)
  y = layer.apply({'params': {'kernel': jnp.asarray(w), 'bias': b}},
                  jnp.asarray(x))
  xb, wb = np_binarize_x(x, mode), np_binarize_w(w, scale)
  np.testing.assert_allclose(y, xb @ wb + b, rtol=1e-5, atol=1e-5)
  gy = randn(*y.shape)

  def loss(x, w):
    return jnp.sum(layer.apply({'params': {'kernel': w, 'bias': b}}, x) * gy)

  dx, dw = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
  np.testing.assert_allclose(dx, (gy @ wb.T) * np_ste_mask(x, mode),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, xb.T @ gy, rtol=1e-5, atol=1e-5)


def test_drop_in_parameters_match_flax():
  x = jnp.ones((2, 8, 8, 3))
  ours = jax.eval_shape(bnn.BinaryConv(5, (3, 3)).init, jax.random.key(0), x)
  theirs = jax.eval_shape(nn.Conv(5, (3, 3)).init, jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, theirs)
  ours = jax.eval_shape(bnn.BinaryDense(4).init, jax.random.key(0), x)
  theirs = jax.eval_shape(nn.Dense(4).init, jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, theirs)


def test_dtype_promotion_bfloat16():
  layer = bnn.BinaryConv(4, (3, 3), dtype=jnp.bfloat16)
  x = jnp.ones((1, 5, 5, 2))
  variables = jax.eval_shape(layer.init, jax.random.key(0), x)
  assert variables['params']['kernel'].dtype == jnp.float32
  assert jax.eval_shape(layer.apply, variables, x).dtype == jnp.bfloat16
