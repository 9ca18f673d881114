"""adderjax.distill against float64 numpy written from PKKD's equations.

The oracle builds every input patch explicitly (loops over output
positions, :mod:`adder_oracle`'s windows) and evaluates the kernels from
their definitions: ``exp(-||x - f||_1 / sigma)`` and
``exp(-||x - f||^2 / (2 sigma^2))``. The library computes the Gaussian
kernel from the convolution's output and two norms, never from patches.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adderjax
from adderjax import distill
import adder_oracle

jax.config.update('jax_enable_x64', False)


def _patches(x, kernel_size, strides, pads, dilation):
  """``{out_index: patch (kh, kw, C)}`` of an NHWC float64 image batch."""
  xp = np.pad(x, [(0, 0)] + list(pads) + [(0, 0)])
  out = {}
  for o, idx, shape in adder_oracle._windows(xp.shape, kernel_size, strides,
                                             dilation):
    out[o] = xp[(slice(None),) + idx + (slice(None),)]
  return out, shape


def _oracle_distances(x, w, strides, pads, dilation, groups):
  """float64 l1 and squared l2 distances of every patch to every filter."""
  n, c_out = x.shape[0], w.shape[-1]
  patches, shape = _patches(x, w.shape[:2], strides, pads, dilation)
  l1 = np.zeros((n,) + tuple(shape) + (c_out,))
  l2 = np.zeros_like(l1)
  cin_g, cout_g = w.shape[2], c_out // groups
  for o, p in patches.items():
    for co in range(c_out):
      g = co // cout_g
      d = p[..., g * cin_g:(g + 1) * cin_g] - w[..., co][None]
      l1[(slice(None),) + o + (co,)] = np.abs(d).reshape(n, -1).sum(1)
      l2[(slice(None),) + o + (co,)] = np.square(d).reshape(n, -1).sum(1)
  return l1, l2


GEOMETRIES = [
    # (H, W, C, kernel, C_out, strides, padding, dilation, groups)
    (7, 6, 3, (3, 3), 4, (1, 1), 'VALID', (1, 1), 1),
    (8, 8, 4, (3, 2), 6, (2, 1), 'SAME', (1, 1), 2),
    (9, 7, 2, (3, 3), 3, (2, 2), ((1, 2), (0, 1)), (2, 1), 1),
]


def _pads(geometry):
  h, w_, _, k, _, s, padding, d, _ = geometry
  if padding == 'VALID':
    return [(0, 0), (0, 0)]
  if padding == 'SAME':
    return adder_oracle.same_padding((h, w_), k, s, d)
  return list(padding)


@pytest.mark.parametrize('geometry', GEOMETRIES)
def test_conv_distances_and_kernels_match_explicit_patches(geometry):
  h, w_, c, k, c_out, s, padding, d, g = geometry
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, h, w_, c)).astype(np.float32)
  w = rng.normal(size=k + (c // g, c_out)).astype(np.float32)
  pads = _pads(geometry)
  l1, l2 = _oracle_distances(x.astype(np.float64), w.astype(np.float64),
                             s, pads, d, g)

  # The CNN side: x.f from the conv, then the expansion with the norms.
  conv_out = jax.lax.conv_general_dilated(
      x, w, s, padding if isinstance(padding, str) else pads,
      rhs_dilation=d, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=g, precision=jax.lax.Precision.HIGHEST)
  d2 = distill.squared_distance_conv(
      x, w, conv_out, strides=s, padding=padding, kernel_dilation=d,
      feature_group_count=g)
  np.testing.assert_allclose(np.asarray(d2), l2, rtol=1e-4,
                             atol=1e-4 * l2.max())
  sigma = 1.7
  np.testing.assert_allclose(
      np.asarray(distill.gaussian_kernel(d2, sigma)),
      np.exp(-l2 / (2 * sigma ** 2)), rtol=1e-4, atol=1e-6)
  # Automatic bandwidth: 2 sigma^2 = the mean squared distance.
  np.testing.assert_allclose(np.asarray(distill.gaussian_kernel(d2)),
                             np.exp(-l2 / l2.mean()), rtol=1e-4, atol=1e-6)

  # The adder side: the Laplace kernel of the adder layer's own output.
  y = adderjax.adder_conv(jnp.asarray(x), jnp.asarray(w), strides=s,
                          padding=padding if isinstance(padding, str)
                          else pads, kernel_dilation=d,
                          feature_group_count=g)
  np.testing.assert_allclose(np.asarray(y), -l1, rtol=1e-5,
                             atol=1e-5 * l1.max())
  np.testing.assert_allclose(np.asarray(distill.laplace_kernel(y, 3.0)),
                             np.exp(-l1 / 3.0), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(np.asarray(distill.laplace_kernel(y)),
                             np.exp(-l1 / l1.mean()), rtol=1e-4, atol=1e-7)


def test_patch_squared_norms_match_explicit_patches():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 9, 8, 4))
  pads = adder_oracle.same_padding((9, 8), (3, 3), (2, 2), (1, 2))
  patches, shape = _patches(x, (3, 3), (2, 2), pads, (1, 2))
  got = np.asarray(distill.patch_squared_norms(
      x.astype(np.float32), (3, 3), strides=2, padding='SAME',
      kernel_dilation=(1, 2), feature_group_count=2))
  assert got.shape == (2,) + tuple(shape) + (2,)
  for o, p in patches.items():
    for g in range(2):
      want = np.square(p[..., 2 * g:2 * g + 2]).reshape(2, -1).sum(1)
      np.testing.assert_allclose(got[(slice(None),) + o + (g,)], want,
                                 rtol=1e-5)


def test_dense_distances_match_numpy():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(5, 7))
  w = rng.normal(size=(7, 3))
  want = np.square(x[:, :, None] - w[None]).sum(1)
  out = jnp.asarray(x, jnp.float32) @ jnp.asarray(w, jnp.float32)
  got = distill.squared_distance_dense(x.astype(np.float32),
                                       w.astype(np.float32), out)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  y = adderjax.adder_dense(jnp.asarray(x, jnp.float32),
                           jnp.asarray(w, jnp.float32))
  l1 = np.abs(x[:, :, None] - w[None]).sum(1)
  np.testing.assert_allclose(np.asarray(distill.laplace_kernel(y, 2.0)),
                             np.exp(-l1 / 2.0), rtol=1e-5)


def test_kd_loss_matches_numpy_and_holds_the_teacher_fixed():
  rng = np.random.default_rng(3)
  s = rng.normal(size=(4, 6))
  t = rng.normal(size=(4, 6))
  temp = 3.0

  def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  p, q = softmax(t / temp), softmax(s / temp)
  want = temp ** 2 * np.mean(np.sum(p * np.log(p / q), -1))
  got = distill.kd_loss(jnp.asarray(s, jnp.float32),
                        jnp.asarray(t, jnp.float32), temp)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # Gradient wrt the student: T (q - p) / batch; none into the teacher.
  gs, gt = jax.grad(distill.kd_loss, argnums=(0, 1))(
      jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), temp)
  np.testing.assert_allclose(np.asarray(gs), temp * (q - p) / 4, rtol=1e-4,
                             atol=1e-7)
  assert not np.any(np.asarray(gt))


def test_feature_loss_is_the_mean_squared_error_with_a_fixed_teacher():
  a = np.array([[1.0, 2.0], [3.0, -1.0]])
  b = np.array([[0.5, 2.0], [1.0, 1.0]])
  got = distill.feature_loss(jnp.asarray(a), jnp.asarray(b))
  assert math.isclose(float(got), np.mean((a - b) ** 2), rel_tol=1e-6)
  gb = jax.grad(distill.feature_loss, argnums=1)(jnp.asarray(a),
                                                  jnp.asarray(b))
  assert not np.any(np.asarray(gb))


@pytest.mark.parametrize('call, error, words', [
    (lambda: distill.laplace_kernel(jnp.zeros(2), sigma=0.0), ValueError,
     ['sigma', '0.0']),
    (lambda: distill.gaussian_kernel(jnp.zeros(2), sigma=float('nan')),
     ValueError, ['sigma', 'nan']),
    (lambda: distill.gaussian_kernel(jnp.zeros(2), sigma='1'), TypeError,
     ['sigma', "'1'"]),
    (lambda: distill.kd_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), -1.0),
     ValueError, ['temperature', '-1.0']),
    (lambda: distill.kd_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4))),
     ValueError, ['(2, 3)', '(2, 4)']),
    (lambda: distill.feature_loss(jnp.zeros(3), jnp.zeros(4)), ValueError,
     ['(3,)', '(4,)']),
    (lambda: distill.squared_distance_dense(jnp.zeros((2, 3)),
                                            jnp.zeros((4, 5)),
                                            jnp.zeros((2, 5))),
     ValueError, ['(2, 3)', '(4, 5)']),
    (lambda: distill.squared_distance_conv(
        jnp.zeros((1, 5, 5, 3)), jnp.zeros((3, 3, 2, 4)),
        jnp.zeros((1, 3, 3, 4))), ValueError, ['3 channels', '(3, 3, 2, 4)']),
    (lambda: distill.squared_distance_conv(
        jnp.zeros((1, 5, 5, 2)), jnp.zeros((3, 3, 2, 4)),
        jnp.zeros((1, 5, 5, 4))), ValueError, ['(1, 5, 5, 4)', '(1, 3, 3)']),
    (lambda: distill.patch_squared_norms(jnp.zeros((1, 5, 5, 2)), (3, 3),
                                         padding='CIRCULAR'),
     ValueError, ['CIRCULAR']),
    (lambda: distill.patch_squared_norms(jnp.zeros((5, 5, 2)), (3, 3)),
     ValueError, ['(5, 5, 2)']),
    (lambda: distill.patch_squared_norms(jnp.zeros((1, 5, 5, 3)), (3, 3),
                                         feature_group_count=2),
     ValueError, ['feature_group_count 2', '3 channels']),
])
def test_bad_input_is_named(call, error, words):
  with pytest.raises(error) as e:
    call()
  for word in words:
    assert word in str(e.value), (word, str(e.value))
