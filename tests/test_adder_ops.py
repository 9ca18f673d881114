"""adder_conv / adder_dense against the independent numpy oracle."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import adder_oracle as oracle
from adderjax import adder_conv
from adderjax import adder_dense
from adderjax.ops import geometry
from adderjax.ops import xla_backend

# (x_shape, kernel_shape, strides, padding, dilation, groups)
CASES = {
    '1d_same': ((2, 9, 3), (3, 3, 4), 1, 'SAME', 1, 1),
    '1d_stride2_valid': ((2, 10, 4), (4, 4, 6), 2, 'VALID', 1, 1),
    '1d_pairs_dil': ((1, 11, 2), (3, 2, 3), 1, [(2, 0)], 2, 1),
    '2d_same': ((2, 7, 7, 4), (3, 3, 4, 5), 1, 'SAME', 1, 1),
    '2d_stride2_same': ((2, 8, 8, 3), (3, 3, 3, 4), 2, 'SAME', 1, 1),
    '2d_int_pad': ((1, 6, 5, 2), (3, 3, 2, 3), (1, 2), 1, 1, 1),
    '2d_seq_int_pad': ((1, 6, 6, 2), (3, 2, 2, 3), 1, (2, 0), 1, 1),
    '2d_pairs': ((2, 6, 7, 3), (2, 3, 3, 2), (2, 1), [(1, 2), (0, 1)], 1, 1),
    '2d_dilation': ((1, 9, 9, 2), (3, 3, 2, 4), 1, 'SAME', (2, 1), 1),
    '2d_groups': ((2, 6, 6, 6), (3, 3, 2, 9), 1, 'SAME', 1, 3),
    '2d_depthwise': ((2, 6, 6, 4), (3, 3, 1, 4), 2, 'SAME', 1, 4),
    '2d_1x1_stride2': ((2, 8, 8, 4), (1, 1, 4, 8), 2, 'VALID', 1, 1),
    '2d_1x1_pad_stride': ((2, 7, 7, 4), (1, 1, 4, 6), (2, 3),
                          [(1, 0), (2, 1)], 1, 1),
    '1d_1x1_pad_groups': ((2, 7, 4), (1, 2, 6), 2, [(1, 2)], 1, 2),
    '3d_1x1_groups': ((1, 4, 3, 5, 4), (1, 1, 1, 2, 6), (1, 2, 1), 'SAME', 1,
                      2),
    '3d_same': ((1, 5, 5, 4, 2), (3, 3, 2, 2, 3), 1, 'SAME', 1, 1),
    '3d_stride_valid': ((2, 6, 5, 5, 2), (2, 3, 3, 2, 4), (2, 1, 2), 'VALID',
                        1, 1),
}


def _pads(case):
  x_shape, k_shape, strides, padding, dilation, _ = case
  nsp = len(x_shape) - 2
  s = (strides,) * nsp if isinstance(strides, int) else tuple(strides)
  d = (dilation,) * nsp if isinstance(dilation, int) else tuple(dilation)
  if padding == 'SAME':
    return s, d, oracle.same_padding(x_shape[1:-1], k_shape[:-2], s, d)
  if padding == 'VALID':
    return s, d, [(0, 0)] * nsp
  if isinstance(padding, int):
    return s, d, [(padding, padding)] * nsp
  return s, d, [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def _data(case, dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=case[0]).astype(dtype)
  w = rng.normal(size=case[1]).astype(dtype)
  return x, w


class ForwardTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(k, v) for k, v in CASES.items()])
  def test_forward_matches_oracle(self, case):
    x, w = _data(case)
    _, _, strides, padding, dilation, groups = case
    fn = self.variant(functools.partial(
        adder_conv, strides=strides, padding=padding,
        kernel_dilation=dilation, feature_group_count=groups))
    y = fn(x, w)
    s, d, pads = _pads(case)
    expected = oracle.forward(x, w, s, pads, d, groups)
    self.assertEqual(y.shape, expected.shape)
    self.assertEqual(y.dtype, jnp.float32)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-4)
    self.assertTrue(bool((y <= 0).all()))

  @parameterized.parameters(jnp.bfloat16, jnp.float16)
  def test_low_precision_accumulates_in_f32(self, dtype):
    case = ((2, 8, 8, 16), (3, 3, 16, 8), 1, 'SAME', 1, 1)
    x, w = _data(case)
    xl, wl = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
    y = adder_conv(xl, wl)
    self.assertEqual(y.dtype, dtype)
    # The oracle sees the same rounded inputs; only the output cast differs.
    s, d, pads = _pads(case)
    expected = oracle.forward(np.asarray(xl, np.float32),
                              np.asarray(wl, np.float32), s, pads, d, 1)
    np.testing.assert_allclose(np.asarray(y, np.float32), expected,
                               rtol=1e-2, atol=1e-2)

  def test_mixed_dtypes_promote(self):
    x = jnp.ones((1, 4, 4, 2), jnp.bfloat16)
    w = jnp.zeros((3, 3, 2, 2), jnp.float32)
    self.assertEqual(adder_conv(x, w).dtype, jnp.float32)

  def test_long_reduction_uses_chunked_loop(self):
    # K = 9 * 40 = 360 > one chunk: exercises the fori_loop path and padding.
    case = ((2, 6, 6, 40), (3, 3, 40, 5), 1, 'SAME', 1, 1)
    x, w = _data(case, seed=3)
    s, d, pads = _pads(case)
    np.testing.assert_allclose(adder_conv(x, w),
                               oracle.forward(x, w, s, pads, d, 1),
                               rtol=1e-5, atol=2e-3)

  @parameterized.product(value=[np.nan, np.inf, -np.inf],
                          case=['2d_same', '2d_1x1_stride2', '2d_stride2_same',
                                '1d_1x1_pad_groups'])
  def test_non_finite_input_reaches_exactly_its_receptive_field(self, value,
                                                                 case):
    # The oracle's -|x - w| is NaN / -inf exactly where a window holds the
    # bad value; the layer computes the same terms, so the same outputs are
    # NaN (and the same -inf).
    case = CASES[case]
    x, w = _data(case, seed=5)
    x[(0,) * (x.ndim - 1)] = value  # the first position of example 0
    x[(-1,) * (x.ndim - 1)] = value  # the last position of the last example
    _, _, strides, padding, dilation, groups = case
    y = np.asarray(adder_conv(x, w, strides=strides, padding=padding,
                              kernel_dilation=dilation,
                              feature_group_count=groups))
    s, d, pads = _pads(case)
    with np.errstate(invalid='ignore'):
      expected = oracle.forward(x, w, s, pads, d, groups)
    np.testing.assert_array_equal(np.isfinite(y), np.isfinite(expected))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(y[finite], expected[finite], rtol=1e-5,
                               atol=1e-4)

  def test_zero_padding_enters_distance(self):
    x = jnp.zeros((1, 1, 1, 1))
    w = jnp.full((3, 3, 1, 1), 2.0)
    # every tap (8 padded zeros + the input zero) contributes |0 - 2|.
    self.assertEqual(float(adder_conv(x, w, padding=1)[0, 0, 0, 0]), -18.0)


class GradientTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(
      case=['1d_stride2_valid', '2d_same', '2d_stride2_same', '2d_pairs',
            '2d_dilation', '2d_groups', '2d_depthwise', '3d_stride_valid',
            '2d_1x1_stride2', '2d_1x1_pad_stride', '1d_1x1_pad_groups',
            '3d_1x1_groups'],
      mode=['full_precision', 'sign', 'unclipped'])
  def test_grads_match_paper_formulas(self, case, mode):
    case = CASES[case]
    x, w = _data(case, seed=1)
    # Half-scale inputs put many |w - x| inside and many outside [-1, 1].
    x = x * 0.7
    _, _, strides, padding, dilation, groups = case
    y_shape = oracle.forward(x, w, *_pads(case)[:1], _pads(case)[2],
                             _pads(case)[1], groups).shape
    gy = np.random.default_rng(2).normal(size=y_shape).astype(np.float32)

    def loss(x, w):
      y = adder_conv(x, w, strides, padding, dilation, groups, grad=mode)
      return jnp.sum(y * gy)

    dx, dw = self.variant(jax.grad(loss, argnums=(0, 1)))(x, w)
    s, d, pads = _pads(case)
    edx, edw = oracle.grads(x, w, gy, s, pads, d, groups, mode)
    np.testing.assert_allclose(dx, edx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, edw, rtol=1e-4, atol=1e-3)

  def test_sign_mode_is_exact_gradient(self):
    # Inputs on a grid so that x - w is never within 0.25 of a kink: the exact
    # subgradient then equals central finite differences of the forward.
    rng = np.random.default_rng(5)
    x = (rng.integers(-3, 3, size=(2, 5, 5, 3)) + 0.25).astype(np.float64)
    w = (rng.integers(-3, 3, size=(3, 3, 3, 2)) - 0.25).astype(np.float64)
    gy = rng.normal(size=(2, 3, 3, 2))
    with jax.enable_x64(True):
      def loss(x, w):
        return jnp.sum(adder_conv(x, w, 2, 1, grad='sign') * gy)
      dx, dw = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
      eps = 1e-3
      for arr, grad_arr, which in ((x, dx, 0), (w, dw, 1)):
        flat = arr.reshape(-1)
        for i in rng.choice(flat.size, size=12, replace=False):
          plus, minus = flat.copy(), flat.copy()
          plus[i] += eps
          minus[i] -= eps
          args_p = [x, w]
          args_m = [x, w]
          args_p[which] = plus.reshape(arr.shape)
          args_m[which] = minus.reshape(arr.shape)
          fd = (float(loss(*args_p)) - float(loss(*args_m))) / (2 * eps)
          self.assertAlmostEqual(float(np.asarray(grad_arr).reshape(-1)[i]),
                                 fd, places=6)

  def test_bf16_grads(self):
    case = CASES['2d_same']
    x, w = _data(case, seed=4)
    xl, wl = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    gy = np.random.default_rng(0).normal(size=(2, 7, 7, 5)).astype(np.float32)
    dx, dw = jax.grad(
        lambda a, b: jnp.sum(adder_conv(a, b).astype(jnp.float32) * gy),
        argnums=(0, 1))(xl, wl)
    self.assertEqual(dx.dtype, jnp.bfloat16)
    self.assertEqual(dw.dtype, jnp.bfloat16)
    # Cotangent rounded to bf16 as the custom_vjp receives it.
    gyb = np.asarray(jnp.asarray(gy, jnp.bfloat16), np.float32)
    edx, edw = oracle.grads(np.asarray(xl, np.float32),
                            np.asarray(wl, np.float32), gyb, (1, 1),
                            [(1, 1), (1, 1)], (1, 1), 1, 'full_precision')
    np.testing.assert_allclose(np.asarray(dx, np.float32), edx, rtol=2e-2,
                               atol=5e-2)
    np.testing.assert_allclose(np.asarray(dw, np.float32), edw, rtol=2e-2,
                               atol=2e-1)


def _check_xla_kernels(x, w, case, **kernel_kwargs):
  """The XLA backend's forward and input-gradient kernels, called with
  ``kernel_kwargs`` (tile sizes, chunk sizes), against the numpy oracle."""
  _, _, strides, padding, dilation, groups = case
  geo = geometry.make_geometry(x.shape, w.shape, strides, padding, dilation,
                               groups)
  s, d, pads = _pads((x.shape,) + case[1:])
  expected = oracle.forward(x, w, s, pads, d, groups)
  y = jax.jit(lambda a, b: xla_backend.conv_forward(a, b, geo,
                                                    **kernel_kwargs))(x, w)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-4)
  gy = np.random.default_rng(7).normal(size=expected.shape).astype(np.float32)
  for mode in ('full_precision', 'sign'):
    dx = jax.jit(lambda a, b, g, mode=mode: xla_backend.conv_input_grad(
        a, b, g, geo, mode, **kernel_kwargs))(x, w, gy)
    edx, _ = oracle.grads(x, w, gy, s, pads, d, groups, mode)
    np.testing.assert_allclose(dx, edx, rtol=1e-4, atol=1e-4)


class XlaBatchTilingTest(parameterized.TestCase):
  """The XLA kernels split large batches into tiles (``tile_bytes``); the
  oracle cases above are too small to be tiled, so force one example per
  tile here."""

  @parameterized.parameters('2d_stride2_same', '2d_groups', '1d_pairs_dil')
  def test_tiled_kernels_match_oracle(self, case_name):
    case = CASES[case_name]
    x, w = _data(case, seed=6)
    x = np.concatenate([x, 0.5 * x[::-1]])  # 2 * batch examples
    _check_xla_kernels(x, w, case, tile_bytes=1)


class XlaChunkingTest(parameterized.TestCase):
  """The XLA kernels sum ``terms`` (tap, feature) pairs per fused chunk: one
  chunk is straight-line code, more are a loop. Cover 1, 2 and many chunks
  (and chunks that straddle taps and padded features)."""

  @parameterized.product(
      case_name=['2d_same', '2d_stride2_same', '2d_groups',
                 '2d_1x1_pad_stride', '3d_stride_valid'],
      terms=[1, 2, 5, 1000])
  def test_chunked_kernels_match_oracle(self, case_name, terms):
    case = CASES[case_name]
    x, w = _data(case, seed=8)
    _check_xla_kernels(x, w, case, terms=terms)


class DenseTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(mode=['full_precision', 'sign', 'unclipped'],
                         batch=[(5,), (2, 3)])
  def test_dense_matches_oracle(self, mode, batch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=batch + (7,)).astype(np.float32)
    w = rng.normal(size=(7, 4)).astype(np.float32)
    gy = rng.normal(size=batch + (4,)).astype(np.float32)
    fn = self.variant(functools.partial(adder_dense, grad=mode))
    y = fn(x, w)
    expected = -np.abs(x[..., :, None] - w).sum(-2)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    dx, dw = jax.grad(lambda a, b: jnp.sum(fn(a, b) * gy), (0, 1))(x, w)
    # Dense = 1x1 conv over one position per example.
    x2 = x.reshape(-1, 1, 7)
    edx, edw = oracle.grads(x2, w[None], gy.reshape(-1, 1, 4), (1,), [(0, 0)],
                            (1,), 1, mode)
    np.testing.assert_allclose(dx, edx.reshape(x.shape), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, edw[0], rtol=1e-5, atol=1e-4)


class TransformsTest(parameterized.TestCase):

  def test_vmap_matches_loop(self):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 2, 6, 6, 2)).astype(np.float32)
    w = rng.normal(size=(3, 3, 3, 2, 4)).astype(np.float32)
    f = lambda a, b: adder_conv(a, b, 2, 'SAME')
    y = jax.vmap(f)(x, w)
    for i in range(3):
      np.testing.assert_allclose(y[i], f(x[i], w[i]), rtol=1e-6, atol=1e-5)
    g = jax.vmap(jax.grad(lambda a, b: f(a, b).sum(), (0, 1)))(x, w)
    for i in range(3):
      gi = jax.grad(lambda a, b: f(a, b).sum(), (0, 1))(x[i], w[i])
      chex.assert_trees_all_close(jax.tree.map(lambda t: t[i], g), gi,
                                  rtol=1e-5, atol=1e-4)

  def test_remat_and_jit_grad(self):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
    w = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
    loss = lambda a, b: jnp.sum(jnp.tanh(adder_conv(a, b)))
    g_plain = jax.grad(loss, (0, 1))(x, w)
    g_remat = jax.jit(jax.grad(jax.checkpoint(loss), (0, 1)))(x, w)
    chex.assert_trees_all_close(g_plain, g_remat, rtol=1e-5, atol=1e-5)

  def test_second_call_does_not_recompile(self):
    f = jax.jit(lambda a, b: adder_conv(a, b))
    x = jnp.ones((1, 5, 5, 2))
    w = jnp.ones((3, 3, 2, 2))
    f(x, w)
    size = f._cache_size()
    f(x + 1, w)
    self.assertEqual(f._cache_size(), size)


class BadInputTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('rank', (2, 5, 5), (3, 3, 2, 4), {}, ValueError, 'rank'),
      ('channels', (1, 5, 5, 3), (3, 3, 2, 4), {}, ValueError, '3'),
      ('groups_in', (1, 5, 5, 3), (3, 3, 1, 4), {'feature_group_count': 2},
       ValueError, 'feature_group_count=2'),
      ('groups_out', (1, 5, 5, 4), (3, 3, 2, 3), {'feature_group_count': 2},
       ValueError, 'output features 3'),
      ('groups_zero', (1, 5, 5, 4), (3, 3, 4, 4), {'feature_group_count': 0},
       ValueError, 'feature_group_count'),
      ('padding_name', (1, 5, 5, 2), (3, 3, 2, 4), {'padding': 'FULL'},
       ValueError, "'FULL'"),
      ('padding_len', (1, 5, 5, 2), (3, 3, 2, 4), {'padding': [(1, 1)]},
       ValueError, 'padding'),
      ('padding_neg', (1, 5, 5, 2), (3, 3, 2, 4), {'padding': -1},
       ValueError, 'non-negative'),
      ('padding_type', (1, 5, 5, 2), (3, 3, 2, 4), {'padding': 1.5},
       TypeError, '1.5'),
      ('stride_zero', (1, 5, 5, 2), (3, 3, 2, 4), {'strides': 0},
       ValueError, 'strides'),
      ('stride_len', (1, 5, 5, 2), (3, 3, 2, 4), {'strides': (1, 1, 1)},
       ValueError, 'strides'),
      ('dilation_neg', (1, 5, 5, 2), (3, 3, 2, 4), {'kernel_dilation': -2},
       ValueError, 'kernel_dilation'),
      ('too_small', (1, 2, 2, 2), (3, 3, 2, 4), {'padding': 'VALID'},
       ValueError, 'smaller'),
      ('grad', (1, 5, 5, 2), (3, 3, 2, 4), {'grad': 'exact'}, ValueError,
       "'exact'"),
      ('implementation', (1, 5, 5, 2), (3, 3, 2, 4),
       {'implementation': 'cuda'}, ValueError, "'cuda'"),
  )
  def test_conv_errors(self, x_shape, k_shape, kwargs, error, message):
    with self.assertRaisesRegex(error, message.replace('(', r'\(').replace(
        ')', r'\)').replace('[', r'\[')):
      adder_conv(jnp.ones(x_shape), jnp.ones(k_shape), **kwargs)

  def test_integer_inputs(self):
    with self.assertRaisesRegex(TypeError, 'int32'):
      adder_conv(jnp.ones((1, 5, 5, 2), jnp.int32), jnp.ones((3, 3, 2, 4)))
    with self.assertRaisesRegex(TypeError, 'kernel'):
      adder_dense(jnp.ones((2, 3)), jnp.ones((3, 4), jnp.int8))

  def test_dense_errors(self):
    with self.assertRaisesRegex(ValueError, r'\(3, 4, 1\)'):
      adder_dense(jnp.ones((2, 3)), jnp.ones((3, 4, 1)))
    with self.assertRaisesRegex(ValueError, 'has 5 features'):
      adder_dense(jnp.ones((2, 5)), jnp.ones((3, 4)))


if __name__ == '__main__':
  pytest.main([__file__])
