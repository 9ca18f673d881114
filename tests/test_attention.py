"""Adder attention against independent numpy references.

``adderjax.attention`` (l1 scores, their HardTanh gradients, the attention map
with the identity fix, effective rank), ``adderjax.linen.AdderDenseGeneral`` /
``AdderMultiHeadAttention`` and the zoo's ``vit_tiny``. The references below
are written from the definitions with explicit float64 broadcasting
(``-|q[:, :, None] - k[:, None]|.sum(-1)``); they share no code with
``adderjax`` (in particular not its grouped-convolution layout).
"""

from __future__ import annotations

import functools
import math
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from adderjax import attention as att
from adderjax import linen as alinen
from adderjax.models import create_model

GRAD_MODES = ('full_precision', 'sign', 'unclipped')


# ----------------------------------------------------------------------------
# numpy references (float64)
# ----------------------------------------------------------------------------


def np_l1_scores(q, k):
  """``s[..., h, i, j] = -sum_d |q[..., i, h, d] - k[..., j, h, d]|``."""
  qh = np.moveaxis(np.asarray(q, np.float64), -2, -3)  # [..., H, Lq, D]
  kh = np.moveaxis(np.asarray(k, np.float64), -2, -3)  # [..., H, Lk, D]
  return -np.abs(qh[..., :, None, :] - kh[..., None, :, :]).sum(-1)


def _grad_fn(mode):
  return {'full_precision': lambda d: np.clip(d, -1.0, 1.0),
          'sign': np.sign,
          'unclipped': lambda d: d}[mode]


def np_l1_grads(q, k, g, mode):
  """``dq_i = sum_j g_ij f(k_j - q_i)``, ``dk_j = sum_i g_ij f(q_i - k_j)``."""
  f = _grad_fn(mode)
  qh = np.moveaxis(np.asarray(q, np.float64), -2, -3)
  kh = np.moveaxis(np.asarray(k, np.float64), -2, -3)
  g = np.asarray(g, np.float64)[..., None]          # [..., H, Lq, Lk, 1]
  diff = kh[..., None, :, :] - qh[..., :, None, :]  # k_j - q_i
  dq = (g * f(diff)).sum(-2)                        # [..., H, Lq, D]
  dk = (g * f(-diff)).sum(-3)                       # [..., H, Lk, D]
  return np.moveaxis(dq, -3, -2), np.moveaxis(dk, -3, -2)


def np_softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def np_weights(q, k, *, score='l1', scale=None, bias=None, mask=None,
               identity=None, lam=1.0):
  """The attention map, written from the docstring's definitions."""
  q = np.asarray(q, np.float64)
  k = np.asarray(k, np.float64)
  d = q.shape[-1]
  if score == 'l1':
    s = np_l1_scores(q, k)
    default = 1.0 / math.sqrt(2.0 * (1.0 - 2.0 / math.pi) * d)
  else:
    s = np.einsum('...qhd,...khd->...hqk', q, k)
    default = 1.0 / math.sqrt(d)
  logits = s * (default if scale is None else scale)
  if identity == 'logits':
    logits = logits + lam * np.eye(s.shape[-1])
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  w = np_softmax(logits)
  if identity == 'output':
    w = (w + lam * np.eye(s.shape[-1])) / (1.0 + lam)
  return w


def np_apply(w, v):
  return np.einsum('...hqk,...khd->...qhd', w, np.asarray(v, np.float64))


def np_adder_dense(x, kernel, bias, n_axes=1):
  """``y[..., f] = -sum_k |x[..., k] - W[k, f]| + b[f]`` over the last
  ``n_axes`` axes of ``x`` (the kernel's leading ``n_axes`` axes)."""
  x = np.asarray(x, np.float64)
  kernel = np.asarray(kernel, np.float64)
  in_shape, features = kernel.shape[:n_axes], kernel.shape[n_axes:]
  batch = x.shape[:x.ndim - n_axes]
  xf = x.reshape(*batch, math.prod(in_shape))
  wf = kernel.reshape(math.prod(in_shape), math.prod(features))
  y = -np.abs(xf[..., :, None] - wf).sum(-2)
  y = y.reshape(*batch, *features)
  if bias is not None:
    y = y + np.asarray(bias, np.float64)
  return y


def np_effective_rank(w):
  sigma = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
  p = sigma / sigma.sum(-1, keepdims=True)
  safe = np.where(p > 0, p, 1.0)
  return np.exp(-(p * np.log(safe)).sum(-1))


def _key(seed):
  """A PRNG key for inits and dropout. Threefry (the default) is compiled
  into every program that draws from it, ~1 s of CPU each time (a ViT's
  init: 7 s instead of 2); what is tested here does not depend on the
  generator."""
  return jax.random.key(seed, impl='rbg')


def _normal(shape, seed, dtype=np.float32):
  return np.random.default_rng(seed).normal(size=shape).astype(dtype)


# ----------------------------------------------------------------------------
# 1. l1_scores forward
# ----------------------------------------------------------------------------

# (batch dims, Lq, Lk, heads, head_dim)
SHAPES = {
    'no_batch_h1_d8': ((), 5, 3, 1, 8),
    'no_batch_h3_d1': ((), 4, 6, 3, 1),
    'batch1_h3_d8': ((2,), 5, 7, 3, 8),
    'batch1_h1_d1': ((3,), 1, 4, 1, 1),
    'batch2_h3_d8': ((2, 3), 4, 2, 3, 8),
    'batch2_h1_d8_self': ((1, 2), 6, 6, 1, 8),
}


def _qk(case, seed=0, dtype=np.float32):
  batch, lq, lk, h, d = SHAPES[case]
  return (_normal((*batch, lq, h, d), seed, dtype),
          _normal((*batch, lk, h, d), seed + 1, dtype))


# Jitted entry points: one compile per configuration keeps the file fast (the
# eager path of the custom_vjp compiles every primitive separately); the eager
# path is checked once below.
_l1 = jax.jit(att.l1_scores, static_argnames=('grad', 'implementation'))
_weights = jax.jit(att.attention_weights, static_argnames=(
    'score', 'scale', 'identity', 'identity_weight', 'dtype'))
_attention = jax.jit(att.attention, static_argnames=(
    'score', 'scale', 'identity', 'identity_weight', 'dropout_rate',
    'broadcast_dropout', 'deterministic'))
_erank = jax.jit(att.effective_rank)


@functools.partial(jax.jit, static_argnames=(
    'score', 'identity', 'identity_weight', 'dropout_rate',
    'broadcast_dropout', 'deterministic', 'return_weights'))
def _attend(q, k, v, dropout_rng=None, *, score='l1', identity=None,
            identity_weight=1.0, dropout_rate=0.0, broadcast_dropout=True,
            deterministic=True, return_weights=True):
  return att.attend(
      q, k, v, score=score, bias=None, mask=None, scale=None,
      identity=identity, identity_weight=identity_weight,
      dropout_rng=dropout_rng, dropout_rate=dropout_rate,
      broadcast_dropout=broadcast_dropout, deterministic=deterministic,
      grad='full_precision', implementation=None, precision=None, dtype=None,
      return_weights=return_weights)


@functools.partial(jax.jit, static_argnames=('mode', 'implementation'))
def _l1_grads(q, k, g, mode='full_precision', implementation=None):
  def loss(q, k):
    s = att.l1_scores(q, k, grad=mode, implementation=implementation)
    return jnp.sum(s.astype(jnp.float32) * g), s
  (_, s), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(q, k)
  return s, grads


class L1ScoresForwardTest(parameterized.TestCase):

  @parameterized.named_parameters(*[(c, c) for c in SHAPES])
  def test_matches_oracle_float32(self, case):
    q, k = _qk(case)
    s = _l1(q, k)
    expected = np_l1_scores(q, k)
    batch, lq, lk, h, _ = SHAPES[case]
    self.assertEqual(s.shape, (*batch, h, lq, lk))
    self.assertEqual(s.dtype, jnp.float32)
    np.testing.assert_allclose(s, expected, rtol=1e-6, atol=1e-5)

  @parameterized.product(case=('no_batch_h3_d1', 'batch2_h3_d8'),
                         dtype=(jnp.bfloat16, jnp.float16))
  def test_low_precision_inputs(self, case, dtype):
    q, k = _qk(case, seed=3)
    ql, kl = jnp.asarray(q, dtype), jnp.asarray(k, dtype)
    s = _l1(ql, kl)
    self.assertEqual(s.dtype, dtype)
    # The oracle sees the rounded inputs; what is left is the output rounding
    # (accumulation is float32): 2^-8 relative for bfloat16.
    expected = np_l1_scores(np.asarray(ql, np.float64),
                            np.asarray(kl, np.float64))
    rtol = 8e-3 if dtype == jnp.bfloat16 else 1e-3
    np.testing.assert_allclose(np.asarray(s, np.float64), expected, rtol=rtol,
                               atol=1e-2)

  def test_mixed_dtypes_promote(self):
    q, k = _qk('batch1_h3_d8')
    s = _l1(jnp.asarray(q, jnp.bfloat16), k)
    self.assertEqual(s.dtype, jnp.float32)
    expected = np_l1_scores(np.asarray(jnp.asarray(q, jnp.bfloat16),
                                       np.float64), k)
    np.testing.assert_allclose(s, expected, rtol=1e-6, atol=1e-5)

  def test_scores_of_a_point_with_itself_are_zero(self):
    q, _ = _qk('batch2_h1_d8_self')
    s = np.asarray(_l1(q, q))
    np.testing.assert_array_equal(np.diagonal(s, axis1=-2, axis2=-1), 0.0)
    self.assertTrue((s <= 0).all())

  def test_pallas_gpu_interpret_forward(self):
    # The real Pallas kernels, interpreted on CPU (as tests/test_pallas_*.py).
    q, k = _qk('batch2_h3_d8', seed=7)
    s = _l1(q, k, implementation='pallas_gpu_interpret')
    np.testing.assert_allclose(s, np_l1_scores(q, k), rtol=1e-6, atol=1e-5)

  def test_pallas_tpu_interpret_forward_and_grads(self):
    q, k = _qk('batch1_h3_d8', seed=7)
    g = _normal((2, 3, 5, 7), 9)
    s, (dq, dk) = _l1_grads(q, k, g, implementation='pallas_tpu_interpret')
    np.testing.assert_allclose(s, np_l1_scores(q, k), rtol=1e-6, atol=1e-5)
    edq, edk = np_l1_grads(q, k, g, 'full_precision')
    np.testing.assert_allclose(dq, edq, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dk, edk, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------
# 2. l1_scores gradients
# ----------------------------------------------------------------------------


class L1ScoresGradTest(parameterized.TestCase):

  @parameterized.product(mode=GRAD_MODES,
                         case=('no_batch_h1_d8', 'batch2_h3_d8'))
  def test_grads_match_oracle(self, mode, case):
    q, k = _qk(case, seed=11)
    batch, lq, lk, h, _ = SHAPES[case]
    g = _normal((*batch, h, lq, lk), 13)
    _, (dq, dk) = _l1_grads(q, k, g, mode)
    edq, edk = np_l1_grads(q, k, g, mode)
    self.assertEqual(dq.shape, q.shape)
    self.assertEqual(dk.shape, k.shape)
    np.testing.assert_allclose(dq, edq, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dk, edk, rtol=1e-5, atol=1e-5)
    # The inputs reach both sides of the HardTanh's kinks, so the three modes
    # are three different functions here (the oracle is not vacuous).
    diff = np.abs(np_l1_grads(q, k, g, 'sign')[0] -
                  np_l1_grads(q, k, g, 'unclipped')[0])
    self.assertGreater(diff.max(), 1e-2)

  def test_sign_mode_is_the_exact_gradient_float64(self):
    # On a grid where q - k = integer + 0.5 (never within 0.5 of a kink), the
    # loss is linear around the point: central differences are exact.
    rng = np.random.default_rng(21)
    q = (rng.integers(-3, 3, size=(2, 4, 2, 3)) + 0.25).astype(np.float64)
    k = (rng.integers(-3, 3, size=(2, 5, 2, 3)) - 0.25).astype(np.float64)
    g = rng.normal(size=(2, 2, 4, 5))
    with jax.enable_x64(True):
      @jax.jit
      def loss(q, k):
        return jnp.sum(att.l1_scores(q, k, grad='sign') * g)

      dq, dk = jax.jit(jax.grad(loss, (0, 1)))(jnp.asarray(q),
                                               jnp.asarray(k))
      self.assertEqual(dq.dtype, jnp.float64)
      edq, edk = np_l1_grads(q, k, g, 'sign')
      np.testing.assert_allclose(dq, edq, rtol=1e-12, atol=1e-12)
      np.testing.assert_allclose(dk, edk, rtol=1e-12, atol=1e-12)
      eps = 1e-3
      for which, arr, grad in ((0, q, dq), (1, k, dk)):
        flat = arr.reshape(-1)
        for i in rng.choice(flat.size, size=10, replace=False):
          args_p, args_m = [q, k], [q, k]
          plus, minus = flat.copy(), flat.copy()
          plus[i] += eps
          minus[i] -= eps
          args_p[which] = plus.reshape(arr.shape)
          args_m[which] = minus.reshape(arr.shape)
          fd = (float(loss(*args_p)) - float(loss(*args_m))) / (2 * eps)
          self.assertAlmostEqual(float(np.asarray(grad).reshape(-1)[i]), fd,
                                 places=8)

  def test_vmap_of_value_and_grad(self):
    # The vmapped axis is one more batch axis of the scores.
    q, k = _normal((4, 2, 5, 3, 2), 1), _normal((4, 2, 6, 3, 2), 2)
    g = _normal((4, 2, 3, 5, 6), 3)
    s, (dq, dk) = jax.jit(jax.vmap(jax.value_and_grad(
        lambda a, b, g: jnp.sum(att.l1_scores(a, b) * g), (0, 1))))(q, k, g)
    np.testing.assert_allclose(s, (np_l1_scores(q, k) * g).sum((1, 2, 3, 4)),
                               rtol=1e-5, atol=1e-4)
    edq, edk = np_l1_grads(q, k, g, 'full_precision')
    np.testing.assert_allclose(dq, edq, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dk, edk, rtol=1e-5, atol=1e-5)

  def test_bfloat16_grads(self):
    q, k = _qk('batch1_h3_d8', seed=5)
    ql, kl = jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16)
    g = _normal((2, 3, 5, 7), 6)
    _, (dq, dk) = _l1_grads(ql, kl, g)
    self.assertEqual((dq.dtype, dk.dtype), (jnp.bfloat16, jnp.bfloat16))
    gb = np.asarray(jnp.asarray(g, jnp.bfloat16), np.float64)
    edq, edk = np_l1_grads(np.asarray(ql, np.float64),
                           np.asarray(kl, np.float64), gb, 'full_precision')
    np.testing.assert_allclose(np.asarray(dq, np.float64), edq, rtol=2e-2,
                               atol=5e-2)
    np.testing.assert_allclose(np.asarray(dk, np.float64), edk, rtol=2e-2,
                               atol=5e-2)


# ----------------------------------------------------------------------------
# 3. attention_weights / attention / attend
# ----------------------------------------------------------------------------


class DefaultScaleTest(parameterized.TestCase):

  @parameterized.parameters(1, 8, 64, 100)
  def test_formula(self, d):
    self.assertAlmostEqual(att.default_scale(d),
                           1.0 / math.sqrt(2.0 * (1.0 - 2.0 / math.pi) * d),
                           places=12)

  def test_monte_carlo_std_of_random_pairs(self):
    # The l1 score of two independent standard normal vectors of size D has
    # standard deviation 1 / default_scale(D). 20000 independent pairs: the
    # std's relative error is ~0.5%.
    d = 16
    q = _normal((20000, 1, 1, d), 0)
    k = _normal((20000, 1, 1, d), 1)
    s = np.asarray(_l1(q, k), np.float64).ravel()
    self.assertAlmostEqual(float(s.std()) * att.default_scale(d), 1.0,
                           delta=0.03)

  def test_spread_over_the_keys_of_one_query(self):
    # For ONE query the scores vary over random keys a little less than over
    # random pairs (the per-query mean also varies): E_q[Var_k] = (2 -
    # E[m(a)^2]) D = 0.564 D with m(a) = E|a - Z|, against 2 (1 - 2/pi) D =
    # 0.727 D, so the default scale gives each row of logits a standard
    # deviation of sqrt(0.564 / 0.727) = 0.88.
    d = 16
    q = _normal((1, 64, 1, d), 1)
    k = _normal((1, 4096, 1, d), 2)
    s = np.asarray(_l1(q, k), np.float64)[0, 0]
    row_std = float(s.std(-1).mean()) * att.default_scale(d)
    self.assertGreater(row_std, 0.8)
    self.assertLess(row_std, 0.95)


class AttentionWeightsTest(parameterized.TestCase):

  @parameterized.product(identity=(None, 'output', 'logits'),
                         score=('l1', 'dot'))
  def test_weights_match_numpy(self, identity, score):
    q, k = _normal((2, 6, 3, 4), 1), _normal((2, 6, 3, 4), 2)
    w = _weights(q, k, score=score, identity=identity, identity_weight=0.7)
    expected = np_weights(q, k, score=score, identity=identity, lam=0.7)
    self.assertEqual(w.shape, (2, 3, 6, 6))
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)

  @parameterized.parameters('output', 'logits')
  def test_identity_weight_zero_is_the_plain_map(self, identity):
    q = _normal((1, 5, 2, 4), 3)
    np.testing.assert_allclose(
        _weights(q, q, identity=identity, identity_weight=0.0),
        _weights(q, q, identity=None), rtol=1e-6, atol=1e-7)

  def test_output_identity_is_a_convex_mix_with_the_plain_map(self):
    q = _normal((1, 5, 2, 4), 3)
    plain = _weights(q, q, identity=None)
    mixed = _weights(q, q, identity='output', identity_weight=3.)
    np.testing.assert_allclose(mixed, (plain + 3.0 * jnp.eye(5)) / 4.0,
                               rtol=1e-6, atol=1e-7)

  def test_explicit_scale_bias_and_mask(self):
    q, k = _normal((2, 5, 2, 4), 4), _normal((2, 7, 2, 4), 5)
    bias = _normal((1, 2, 5, 7), 6)
    mask = np.random.default_rng(7).random((2, 1, 5, 7)) > 0.4
    mask[..., 0] = True  # no fully masked row
    w = _weights(q, k, bias=bias, mask=mask, scale=0.3, identity=None)
    expected = np_weights(q, k, scale=0.3, bias=bias, mask=mask)
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-6)
    mask_b = np.broadcast_to(mask, w.shape)
    self.assertTrue((np.asarray(w)[~mask_b] == 0).all())
    self.assertTrue((np.asarray(w)[mask_b] > 0).all())

  def test_mask_with_logits_identity(self):
    q = _normal((1, 6, 1, 4), 8)
    mask = np.tril(np.ones((6, 6), bool))  # causal
    w = _weights(q, q, mask=mask, identity='logits', identity_weight=1.5)
    expected = np_weights(q, q, mask=mask, identity='logits', lam=1.5)
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-6)
    self.assertTrue((np.asarray(w)[..., ~mask] == 0).all())

  def test_dtype_argument(self):
    q = _normal((1, 4, 1, 4), 9)
    qb = jnp.asarray(q, jnp.bfloat16)
    self.assertEqual(_weights(q, q).dtype, jnp.float32)
    self.assertEqual(_weights(q, q, dtype=jnp.bfloat16).dtype, jnp.bfloat16)
    self.assertEqual(_weights(qb, qb).dtype, jnp.bfloat16)


class AttentionTest(parameterized.TestCase):

  @parameterized.product(identity=(None, 'output', 'logits'),
                         score=('l1', 'dot'))
  def test_output_matches_numpy(self, identity, score):
    q, k = _normal((2, 5, 3, 4), 1), _normal((2, 5, 3, 4), 2)
    v = _normal((2, 5, 3, 6), 3)  # v_dim != head_dim
    out = _attention(q, k, v, score=score, identity=identity,
                     identity_weight=0.7)
    expected = np_apply(np_weights(q, k, score=score, identity=identity,
                                   lam=0.7), v)
    self.assertEqual(out.shape, (2, 5, 3, 6))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)

  def test_eager_equals_numpy(self):
    # The one eager (un-jitted) run of the chain l1_scores -> weights -> A v.
    q, v = _normal((2, 5, 3, 4), 1), _normal((2, 5, 3, 6), 3)
    np.testing.assert_allclose(att.attention(q, q, v),
                               np_apply(np_weights(q, q, identity='output'),
                                        v), rtol=1e-5, atol=1e-5)

  def test_cross_attention_without_identity(self):
    q, k = _normal((3, 4, 2, 5), 4), _normal((3, 9, 2, 5), 5)
    v = _normal((3, 9, 2, 5), 6)
    out = _attention(q, k, v, identity=None)
    np.testing.assert_allclose(out, np_apply(np_weights(q, k), v), rtol=1e-5,
                               atol=1e-5)

  @parameterized.parameters('output', 'logits')
  def test_cross_attention_with_identity_is_an_error(self, identity):
    q, k = _normal((1, 4, 2, 5), 4), _normal((1, 9, 2, 5), 5)
    # Traced only (eval_shape): attention() computes the map before it checks
    # the identity.
    for fn in (lambda: jax.eval_shape(functools.partial(
                   att.attention, identity=identity), q, k, k),
               lambda: att.attention_weights(q, k, identity=identity)):
      with self.assertRaisesRegex(
          ValueError, f"identity='{identity}'.*self-attention.*4 queries and "
          '9 keys'):
        fn()

  @parameterized.parameters(None, 'logits')
  def test_score_dot_equals_flax(self, identity):
    # identity='logits' with lambda 0 is the plain map: still flax's.
    q, k = _normal((2, 6, 3, 4), 7), _normal((2, 6, 3, 4), 8)
    v = _normal((2, 6, 3, 4), 9)
    bias = _normal((2, 3, 6, 6), 10)
    mask = np.random.default_rng(11).random((2, 1, 6, 6)) > 0.3
    mask[..., 0] = True
    out = _attention(q, k, v, score='dot', identity=identity,
                     identity_weight=0.0, bias=bias, mask=mask)
    ref = jax.jit(nn.dot_product_attention)(q, k, v, bias=bias, mask=mask)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    w = _weights(q, k, score='dot', identity=None, bias=bias, mask=mask)
    ref_w = jax.jit(nn.dot_product_attention_weights)(q, k, bias=bias,
                                                      mask=mask)
    np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-7)

  def test_attend_without_dropout_returns_the_map(self):
    q, k, v = (_normal((2, 6, 2, 4), s) for s in (1, 2, 3))
    out, w = _attend(q, k, v, identity='output', identity_weight=0.5)
    expected = np_weights(q, k, identity='output', lam=0.5)
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, np_apply(expected, v), rtol=1e-5,
                               atol=1e-5)

  def test_attend_with_dropout_returns_the_map_applied(self):
    # One dropout key for all: the same entries of A are dropped in each.
    q, k, v = (_normal((2, 6, 2, 4), s) for s in (1, 2, 3))
    rng = _key(0)
    kwargs = dict(identity_weight=0.5, dropout_rate=0.3, deterministic=False)
    maps = {}
    for identity in (None, 'output', 'logits'):
      out, w = _attend(q, k, v, rng, identity=identity, **kwargs)
      np.testing.assert_allclose(out, np_apply(np.asarray(w, np.float64), v),
                                 rtol=1e-5, atol=1e-5)
      maps[identity] = np.asarray(w, np.float64)
    dropped = maps[None] == 0
    self.assertTrue(dropped.any())
    np.testing.assert_array_equal(maps['logits'] == 0, dropped)
    # 'output': the identity is mixed in after dropout.
    np.testing.assert_allclose(maps['output'],
                               (maps[None] + 0.5 * np.eye(6)) / 1.5,
                               rtol=1e-5, atol=1e-6)
    # attention() applies the same map; without return_weights, no map.
    out, _ = _attend(q, k, v, rng, identity='output', **kwargs)
    out2 = _attention(q, k, v, dropout_rng=rng, identity='output', **kwargs)
    np.testing.assert_allclose(out2, out, rtol=1e-6, atol=1e-6)
    _, none = _attend(q, k, v, identity='output', return_weights=False)
    self.assertIsNone(none)


class DropoutTest(parameterized.TestCase):

  def _maps(self, rate, broadcast, seed=0):
    q, k, v = (_normal((2, 32, 2, 4), s) for s in (1, 2, 3))
    clean = np.asarray(_weights(q, k, identity=None))
    _, dropped = _attend(q, k, v, _key(seed), dropout_rate=rate,
                         deterministic=False, broadcast_dropout=broadcast)
    return clean, np.asarray(dropped)

  @parameterized.parameters(0.1, 0.5)
  def test_keep_statistics_and_rescaling(self, rate):
    clean, dropped = self._maps(rate, broadcast=False)
    self.assertTrue((clean > 0).all())  # a zero below means "dropped"
    kept = dropped != 0
    n = kept.size  # 4096 independent draws
    self.assertAlmostEqual(1.0 - kept.mean(), rate,
                           delta=5 * math.sqrt(rate * (1 - rate) / n))
    np.testing.assert_allclose(dropped[kept], clean[kept] / (1 - rate),
                               rtol=1e-6)

  def test_broadcast_dropout_shares_the_mask_over_batch_dims_and_heads(self):
    _, dropped = self._maps(0.5, broadcast=True)
    kept = dropped != 0
    for b in range(2):
      for h in range(2):
        np.testing.assert_array_equal(kept[b, h], kept[0, 0])
    _, dropped = self._maps(0.5, broadcast=False)
    kept = dropped != 0
    self.assertFalse((kept[0] == kept[1]).all())
    self.assertFalse((kept[:, 0] == kept[:, 1]).all())

  @parameterized.parameters(True, False)
  def test_dropout_equals_flax(self, broadcast):
    # The same key gives flax's dropout mask (drop-in): score='dot', no
    # identity, compared with flax.linen.dot_product_attention_weights.
    q, k, v = (_normal((2, 8, 3, 4), s) for s in (1, 2, 3))
    rng = _key(3)
    out, w = _attend(q, k, v, rng, score='dot', dropout_rate=0.4,
                     deterministic=False, broadcast_dropout=broadcast)
    ref_w = jax.jit(functools.partial(
        nn.dot_product_attention_weights, dropout_rate=0.4,
        deterministic=False, broadcast_dropout=broadcast))(
            q, k, dropout_rng=rng)
    np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-7)
    ref = jax.jit(functools.partial(
        nn.dot_product_attention, dropout_rate=0.4, deterministic=False,
        broadcast_dropout=broadcast))(q, k, v, dropout_rng=rng)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)

  def test_different_keys_different_masks(self):
    _, a = self._maps(0.5, broadcast=True, seed=0)
    _, b = self._maps(0.5, broadcast=True, seed=1)
    self.assertFalse(((a != 0) == (b != 0)).all())

  def test_deterministic_ignores_rate_and_needs_no_rng(self):
    q, k, v = (_normal((2, 6, 2, 4), s) for s in (1, 2, 3))
    ref = _attention(q, k, v)
    out = _attention(q, k, v, dropout_rate=0.5, deterministic=True)
    np.testing.assert_array_equal(out, ref)
    out = _attention(q, k, v, dropout_rate=0.0, deterministic=False)
    np.testing.assert_array_equal(out, ref)

  def test_missing_rng_is_an_error(self):
    q = _normal((1, 4, 1, 4), 1)
    with self.assertRaisesRegex(ValueError, r'dropout_rate=0\.5.*dropout_rng'):
      jax.eval_shape(functools.partial(
          att.attention, dropout_rate=0.5, deterministic=False), q, q, q)

  @parameterized.parameters(1.0, -0.1, 1.5)
  def test_bad_rate(self, rate):
    q = _normal((1, 4, 1, 4), 1)
    with self.assertRaisesRegex(ValueError, f'dropout_rate.*{rate}'):
      att.attention(q, q, q, dropout_rate=rate, deterministic=False,
                    dropout_rng=jax.random.key(0))


# ----------------------------------------------------------------------------
# 4. effective_rank
# ----------------------------------------------------------------------------


class EffectiveRankTest(parameterized.TestCase):

  def test_matches_numpy(self):
    q = _normal((2, 6, 3, 4), 1)
    maps = np.asarray(_weights(q, q, identity=None))
    r = _erank(maps)
    self.assertEqual(r.shape, (2, 3))
    self.assertEqual(r.dtype, jnp.float32)
    np.testing.assert_allclose(r, np_effective_rank(maps), rtol=1e-4)
    rect = _normal((4, 7), 2)
    np.testing.assert_allclose(_erank(rect), np_effective_rank(rect),
                               rtol=1e-4)

  def test_identity_and_constant(self):
    for n in (1, 6):
      np.testing.assert_allclose(
          _erank(jnp.stack([jnp.eye(n), jnp.full((n, n), 1.0 / n)])),
          [n, 1.0], rtol=1e-4)

  def test_identity_fix_raises_the_rank(self):
    # Queries close to each other see almost the same distances: the plain
    # map is close to rank one, (A + I) / 2 close to full rank.
    q = 0.01 * _normal((1, 8, 1, 4), 3)
    plain = _weights(q, q, identity=None)
    fixed = _weights(q, q, identity='output')
    ranks = _erank(jnp.concatenate([plain, fixed]))[:, 0]
    self.assertLess(float(ranks[0]), 1.5)
    self.assertGreater(float(ranks[1]), 6.0)

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, r'at least 2 axes.*\(3,\)'):
      att.effective_rank(jnp.ones(3))
    with self.assertRaisesRegex(TypeError, 'weights.*list'):
      att.effective_rank([[1.0]])


# ----------------------------------------------------------------------------
# 5. Linen modules
# ----------------------------------------------------------------------------


def _init_apply(layer, *args, **apply_kwargs):
  """``layer.init`` then ``layer.apply`` in one jit: (variables, output)."""
  @jax.jit
  def run(*args):
    variables = layer.init(_key(0), *args)
    return variables, layer.apply(variables, *args, **apply_kwargs)
  return run(*args)


class AdderDenseGeneralTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('tuple_features', (2, 3), -1, 1, (3, 4, 6)),
      ('two_axes_tuple', (2, 4), (-2, -1), 2, (2, 3, 4, 6)),
  )
  def test_matches_numpy(self, features, axis, n_axes, x_shape):
    x = _normal(x_shape, 1)
    layer = alinen.AdderDenseGeneral(
        features=features, axis=axis, bias_init=nn.initializers.normal(1.0))
    variables, y = _init_apply(layer, x)
    params = variables['params']
    feats = (features,) if isinstance(features, int) else features
    self.assertEqual(params['kernel'].shape, x_shape[-n_axes:] + feats)
    self.assertEqual(params['bias'].shape, feats)
    # The same variables as flax's DenseGeneral.
    dense = nn.DenseGeneral(features=features, axis=axis)
    self.assertEqual(
        jax.tree.map(jnp.shape, jax.eval_shape(dense.init, jax.random.key(0),
                                               x)),
        jax.tree.map(jnp.shape, variables))
    expected = np_adder_dense(x, params['kernel'], params['bias'], n_axes)
    self.assertEqual(y.shape, x_shape[:len(x_shape) - n_axes] + feats)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-4)

  def test_non_trailing_axis(self):
    x = _normal((3, 4, 6), 2)  # contract axis 1
    layer = alinen.AdderDenseGeneral(features=2, axis=1, use_bias=False)
    variables, y = _init_apply(layer, x)
    expected = np_adder_dense(np.moveaxis(x, 1, -1),
                              variables['params']['kernel'], None)
    self.assertEqual(y.shape, (3, 6, 2))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-4)

  def test_bad_features(self):
    with self.assertRaisesRegex(ValueError, 'features'):
      alinen.AdderDenseGeneral(features=())
    with self.assertRaisesRegex(ValueError, r'features\[1\].*0'):
      alinen.AdderDenseGeneral(features=(2, 0))


def _np_mha(params, xq, xkv, identity, lam, scale=None):
  """Adder MHA from the parameters: adder q/k/v/out projections, l1 scores."""
  q = np_adder_dense(xq, params['query']['kernel'], params['query']['bias'])
  k = np_adder_dense(xkv, params['key']['kernel'], params['key']['bias'])
  v = np_adder_dense(xkv, params['value']['kernel'], params['value']['bias'])
  w = np_weights(q, k, scale=scale, identity=identity, lam=lam)
  o = np_apply(w, v)
  out = np_adder_dense(o, params['out']['kernel'], params['out']['bias'], 2)
  return out, w


class AdderMultiHeadAttentionTest(parameterized.TestCase):

  def test_dense_dot_equals_flax(self):
    # Cross-attention with every shape option of flax's module.
    kwargs = dict(qkv_features=6, out_features=3, normalize_qk=True)
    xq, xkv = _normal((2, 5, 4), 1), _normal((2, 7, 4), 2)
    mask = np.random.default_rng(3).random((2, 1, 5, 7)) > .3
    mask[..., 0] = True
    ref = nn.MultiHeadDotProductAttention(num_heads=2, **kwargs)
    mine = alinen.AdderMultiHeadAttention(
        num_heads=2, projection='dense', score='dot', identity=None, **kwargs)

    @jax.jit
    def run(xq, xkv, mask):
      ref_vars = ref.init(_key(0), xq, xkv)
      mine_vars = mine.init(_key(0), xq, xkv)
      outs = [m.apply(ref_vars, xq, xkv, mask=mask) for m in (ref, mine)]
      return ref_vars, mine_vars, outs

    ref_vars, mine_vars, (y_ref, y) = run(xq, xkv, mask)
    self.assertEqual(jax.tree.structure(ref_vars),
                     jax.tree.structure(mine_vars))
    self.assertEqual(jax.tree.map(jnp.shape, ref_vars),
                     jax.tree.map(jnp.shape, mine_vars))
    # Same names, shapes and initialisers: the same initial parameters.
    chex.assert_trees_all_close(ref_vars, mine_vars)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)

  def test_adder_projections_match_numpy_and_sow(self):
    identity = 'output'  # the map sown must include the identity
    xq = _normal((2, 5, 6), 4)
    layer = alinen.AdderMultiHeadAttention(
        num_heads=2, qkv_features=6, out_features=3, identity=identity,
        identity_weight=0.5, bias_init=nn.initializers.normal(1.0),
        score_scale=0.05)  # keeps the softmax of the large adder scores soft

    @jax.jit
    def run(x):
      variables = layer.init(_key(1), x)
      y, state = layer.apply(variables, x, sow_weights=True,
                             mutable=['intermediates'])
      _, state2 = layer.apply(variables, x, mutable=['intermediates'])
      return variables, y, state, state2

    variables, y, state, state2 = run(xq)
    params = variables['params']
    self.assertEqual(params['query']['kernel'].shape, (6, 2, 3))
    self.assertEqual(params['out']['kernel'].shape, (2, 3, 3))
    expected, w = _np_mha(params, xq, xq, identity, 0.5, scale=0.05)
    self.assertLess(float(w.max()), 0.99)  # not a one-hot map
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-3)
    (sown,) = state['intermediates']['attention_weights']
    self.assertEqual(sown.shape, (2, 2, 5, 5))
    np.testing.assert_allclose(sown, w, rtol=1e-4, atol=1e-5)
    self.assertNotIn('intermediates', state2)

  def test_adder_projections_cross_attention_default_scale(self):
    xq, xkv = _normal((2, 3, 4), 5), _normal((2, 6, 4), 6)
    layer = alinen.AdderMultiHeadAttention(
        num_heads=1, qkv_features=2, identity=None,
        kernel_init=nn.initializers.normal(0.3))
    variables, y = _init_apply(layer, xq, xkv)
    expected, _ = _np_mha(variables['params'], xq, xkv, None, 1.0)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)

  def test_dropout_through_the_module(self):
    x = _normal((2, 6, 4), 8)
    layer = alinen.AdderMultiHeadAttention(num_heads=2, dropout_rate=0.5)

    @jax.jit
    def run(x):
      variables = layer.init(_key(0), x, deterministic=True)
      a = layer.apply(variables, x, deterministic=True)
      b = layer.apply(variables, x, deterministic=False,
                      rngs={'dropout': _key(1)})
      return a, b

    a, b = run(x)
    self.assertFalse(np.allclose(a, b))
    self.assertTrue(np.isfinite(b).all())
    with self.assertRaisesRegex(Exception, 'deterministic'):
      layer.apply(jax.eval_shape(layer.init, jax.random.key(0), x,
                                 deterministic=True), x)

  def test_bad_arguments(self):
    for kwargs, pattern in ((dict(num_heads=0), 'num_heads.*0'),
                            (dict(num_heads=2, projection='conv'), 'conv'),
                            (dict(num_heads=2, score='cos'), 'cos'),
                            (dict(num_heads=2, identity='eye'), 'eye'),
                            (dict(num_heads=2, identity_weight=-1.0), '-1'),
                            (dict(num_heads=2, score_scale=0.0),
                             'score_scale'),
                            (dict(num_heads=2, grad='exact'), 'exact')):
      with self.subTest(**{k: str(v) for k, v in kwargs.items()}):
        with self.assertRaisesRegex(ValueError, pattern):
          alinen.AdderMultiHeadAttention(**kwargs)
    layer = alinen.AdderMultiHeadAttention(num_heads=3)
    with self.assertRaisesRegex(ValueError,
                                'qkv_features=4.*num_heads=3'):
      jax.eval_shape(layer.init, jax.random.key(0), jnp.ones((1, 2, 4)))


# ----------------------------------------------------------------------------
# 6. The ViT
# ----------------------------------------------------------------------------


def _vit_data(n=4, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, 28, 28, 1)).astype(np.float32),
          rng.integers(0, 10, size=n))


def _vit_loss(model, variables):
  def loss(params, x, labels):
    logits, _ = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']}, x,
        train=True, mutable=['batch_stats'])
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], -1)), logits
  return loss


# (kind, attention, identity): each kind and score by default (the identity
# modes are tested on the module above). The gradient of an adder ViT takes
# ~10 s of CPU to compile, so the default tests run the forward pass and the
# slow ones (every combination) add the train-mode gradient.
VIT_FAST = (('adder', 'l1', 'logits'), ('cnn', 'dot', 'output'))
VIT_ALL = tuple((kind, a, i) for kind in ('cnn', 'adder')
                for a in ('l1', 'dot') for i in ('output', 'logits', 'none'))


def _check_vit(test, kind, attention, identity, grads):
  """Init, eval forward (and train-mode loss gradient) of a small ViT."""
  model = create_model('vit_tiny', kind=kind, num_classes=10, depth=1,
                       hidden=8, num_heads=2, mlp_dim=8,
                       attention=attention, identity=identity)
  x, labels = _vit_data(n=2)

  @jax.jit
  def run(x, labels):
    variables = model.init(_key(0), x, train=False)
    logits = model.apply(variables, x, train=False)
    if not grads:
      return logits, None
    return logits, jax.value_and_grad(
        _vit_loss(model, variables), has_aux=True)(
            variables['params'], x, labels)

  logits, loss_grads = run(x, labels)
  test.assertEqual(logits.shape, (2, 10))
  test.assertEqual(logits.dtype, jnp.float32)
  test.assertTrue(np.isfinite(logits).all())
  layer = model.attention_layer(train=False)
  test.assertEqual(layer.keywords['score'], attention)
  test.assertEqual(layer.keywords['projection'],
                   'adder' if kind == 'adder' else 'dense')
  test.assertEqual(layer.keywords['identity'],
                   identity if attention == 'l1' and identity != 'none'
                   else None)
  if grads:
    (loss, train_logits), g = loss_grads
    test.assertTrue(np.isfinite(loss))
    test.assertTrue(np.isfinite(train_logits).all())
    for leaf in jax.tree.leaves(g):
      test.assertTrue(np.isfinite(leaf).all())
    # The scores' gradient reaches the query and key projections.
    attn = g['block0']['attn']
    for name in ('query', 'key', 'value', 'out'):
      test.assertGreater(float(jnp.abs(attn[name]['kernel']).max()), 0.0)


class ViTTest(parameterized.TestCase):

  @parameterized.parameters(*VIT_FAST)
  def test_forward_is_finite(self, kind, attention, identity):
    _check_vit(self, kind, attention, identity, grads=False)

  def test_default_attention_of_each_kind(self):
    for kind, scores in (('adder', 'l1'), ('cnn', 'dot')):
      model = create_model('vit_tiny', kind=kind, num_classes=10)
      self.assertEqual(model.scores(), scores)

  @parameterized.named_parameters(
      ('identity', dict(identity='foo'), "'foo'"),
      ('attention', dict(attention='cos'), "'cos'"),
      ('heads', dict(num_heads=3, hidden=16), 'num_heads=3.*hidden=16'),
      ('pool', dict(pool='max'), "'max'"),
      ('identity_weight', dict(identity_weight=-2.0), '-2'),
      ('depth', dict(depth=0), 'depth'),
  )
  def test_bad_fields(self, overrides, pattern):
    with self.assertRaisesRegex(ValueError, pattern):
      create_model('vit_tiny', kind='adder', num_classes=10, **overrides)

  def test_bnn_kind_is_refused(self):
    with self.assertRaisesRegex(ValueError, "'bnn'"):
      create_model('vit_tiny', kind='bnn', num_classes=10)

  def test_patch_size_must_divide_the_image(self):
    model = create_model('vit_tiny', kind='adder', num_classes=10,
                         patch_size=5, depth=1, hidden=8, num_heads=2)
    with self.assertRaisesRegex(ValueError, 'patch_size=5.*28x28'):
      jax.eval_shape(functools.partial(model.init, train=False),
                     jax.random.key(0), jnp.zeros((1, 28, 28, 1)))


class ViTJitTest(parameterized.TestCase):

  def test_one_block_train_gradient_jit_equals_eager(self):
    """The issue's check at the smallest size (the slow test: 2 blocks)."""
    model = create_model('vit_tiny', kind='adder', num_classes=10, depth=1,
                         hidden=8, num_heads=2, mlp_dim=8)
    x, labels = _vit_data(n=2)
    variables = jax.jit(functools.partial(model.init, train=False))(
        _key(0), x)
    loss = jax.value_and_grad(_vit_loss(model, variables), has_aux=True)
    (l_eager, _), g_eager = loss(variables['params'], x, labels)
    (l_jit, _), g_jit = jax.jit(loss)(variables['params'], x, labels)
    np.testing.assert_allclose(l_jit, l_eager, rtol=1e-5)
    chex.assert_trees_all_close(g_jit, g_eager, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
class ViTSlowTest(parameterized.TestCase):
  """Marked slow as a class: absl's parameterized copies drop method marks."""

  def test_train_loss_gradient_jit_equals_eager(self):
    # Eager: every primitive of the model runs (and compiles) on its own.
    model = create_model('vit_tiny', kind='adder', num_classes=10, depth=2,
                         hidden=16, num_heads=2, mlp_dim=16)
    x, labels = _vit_data()
    variables = jax.jit(functools.partial(model.init, train=False))(
        _key(0), x)
    loss = jax.value_and_grad(_vit_loss(model, variables), has_aux=True)
    (l_eager, _), g_eager = loss(variables['params'], x, labels)
    (l_jit, _), g_jit = jax.jit(loss)(variables['params'], x, labels)
    self.assertTrue(np.isfinite(l_eager))
    np.testing.assert_allclose(l_jit, l_eager, rtol=1e-5)
    # Float32 reassociation only (fused vs op-by-op sums): the largest
    # difference seen is 3e-6 (patch_embed kernel, gradients up to 0.65).
    chex.assert_trees_all_close(g_jit, g_eager, rtol=1e-4, atol=1e-5)
    for leaf in jax.tree.leaves(g_eager):
      self.assertTrue(np.isfinite(leaf).all())

  @parameterized.parameters(*VIT_ALL)
  def test_forward_and_grads_are_finite(self, kind, attention, identity):
    _check_vit(self, kind, attention, identity, grads=True)


# ----------------------------------------------------------------------------
# 7. Bad input to the functional ops
# ----------------------------------------------------------------------------


class BadInputTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.q = _normal((2, 5, 3, 4), 1)

  @parameterized.parameters('l1_scores', 'attention_weights', 'attention')
  def test_int_dtypes(self, fn):
    q, qi = self.q, self.q.astype(np.int32)
    call = getattr(att, fn)
    args = (lambda a, b: (a, b, q)) if fn == 'attention' else (
        lambda a, b: (a, b))
    with self.assertRaisesRegex(TypeError, 'query.*int32'):
      call(*args(qi, q))
    with self.assertRaisesRegex(TypeError, 'key.*int32'):
      call(*args(q, qi))

  @parameterized.named_parameters(
      ('heads', (2, 5, 2, 4), r'heads and head_dim.*\(2, 5, 2, 4\)'),
      ('head_dim', (2, 5, 3, 5), r'heads and head_dim.*\(2, 5, 3, 5\)'),
      ('batch', (3, 5, 3, 4), r'batch dims differ.*\(3, 5, 3, 4\)'),
      ('rank', (5, 3, 4), r'same rank.*\(5, 3, 4\)'),
  )
  def test_mismatched_query_key(self, k_shape, pattern):
    k = _normal(k_shape, 2)
    for call in (lambda: att.l1_scores(self.q, k),
                 lambda: att.attention_weights(self.q, k, identity=None),
                 lambda: att.attention(self.q, k, k, identity=None)):
      with self.assertRaisesRegex(ValueError, pattern):
        call()

  def test_rank_below_three(self):
    x = _normal((5, 4), 3)
    with self.assertRaisesRegex(ValueError, r'at least 3.*\(5, 4\)'):
      att.l1_scores(x, x)
    with self.assertRaisesRegex(ValueError, r'at least 3.*\(5, 4\)'):
      att.attention(x, x, x)

  def test_zero_head_dim(self):
    x = np.zeros((1, 2, 1, 0), np.float32)
    with self.assertRaisesRegex(ValueError, 'head_dim is 0'):
      att.l1_scores(x, x)

  @parameterized.parameters((2, 4, 3, 4), (2, 5, 2, 4), (1, 5, 3, 4),
                            (2, 5, 3))
  def test_value_shape_mismatch(self, *v_shape):
    v = _normal(v_shape, 4)
    with self.assertRaisesRegex(ValueError,
                                re.escape(f'value shape {v_shape}')):
      att.attention(self.q, self.q, v)

  def test_value_not_an_array(self):
    with self.assertRaisesRegex(TypeError, 'value.*None'):
      att.attention(self.q, self.q, None)

  @parameterized.parameters('attention_weights', 'attention')
  def test_bad_numbers_and_choices(self, fn):
    call = getattr(att, fn)
    args = (self.q, self.q, self.q) if fn == 'attention' else (self.q, self.q)
    for kwargs, pattern in (
        (dict(identity_weight=-0.5), r'identity_weight.*-0\.5'),
        (dict(identity_weight=float('nan')), 'identity_weight.*nan'),
        (dict(scale=0.0), r'scale.*0\.0'),
        (dict(scale=-2.0), r'scale.*-2\.0'),
        (dict(scale=float('inf')), 'scale.*inf'),
        (dict(score='cos'), "score.*'cos'"),
        (dict(identity='diag'), "identity.*'diag'"),
        (dict(grad='exact'), "grad.*'exact'"),
        (dict(implementation='cuda'), "implementation.*'cuda'")):
      with self.subTest(**{k: str(v) for k, v in kwargs.items()}):
        with self.assertRaisesRegex(ValueError, pattern):
          call(*args, **kwargs)

  def test_l1_scores_bad_choices(self):
    with self.assertRaisesRegex(ValueError, "grad.*'exact'"):
      att.l1_scores(self.q, self.q, grad='exact')
    with self.assertRaisesRegex(ValueError, "implementation.*'cuda'"):
      att.l1_scores(self.q, self.q, implementation='cuda')

  def test_default_scale_bad_head_dim(self):
    for d in (0, -3):
      with self.assertRaisesRegex(ValueError, f'head_dim.*{d}'):
        att.default_scale(d)
