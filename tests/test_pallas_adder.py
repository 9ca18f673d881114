"""``adderjax.adder_conv`` / ``adder_dense`` through the Pallas backends.

The interpret-mode backends (``'pallas_gpu_interpret'``,
``'pallas_tpu_interpret'``) run the real kernels on CPU; the whole custom_vjp
(forward, input gradient + col2im, weight gradient) is compared with
``implementation='xla'`` over strides, every padding form, dilation, groups,
1-D/2-D inputs, every grad mode and bf16. Also: backend resolution and the
vmap rule of the partitioned ops.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import adderjax
from adderjax.ops import backends

INTERPRET = ('pallas_gpu_interpret', 'pallas_tpu_interpret')

# (x_shape, kernel_shape, kwargs): spatial sizes not divisible by the strides.
CASES = {
    'same_s1': ((2, 7, 6, 3), (3, 3, 3, 5), dict(strides=1, padding='SAME')),
    'valid_s2_groups': ((2, 9, 7, 4), (3, 3, 2, 6),
                        dict(strides=2, padding='VALID',
                             feature_group_count=2)),
    'int_pad_s21': ((1, 8, 7, 3), (2, 3, 3, 4),
                    dict(strides=(2, 1), padding=1)),
    'pairs_dilated': ((2, 7, 8, 2), (3, 2, 2, 3),
                      dict(padding=((1, 0), (2, 1)), kernel_dilation=(2, 1))),
    'conv1d_depthwise': ((3, 11, 4), (3, 1, 4),
                         dict(strides=2, padding=[(2, 1)],
                              feature_group_count=4)),
}


def _inputs(case, dtype=jnp.float32, seed=0):
  x_shape, k_shape, kwargs = CASES[case]
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=x_shape), dtype)
  k = jnp.asarray(rng.normal(size=k_shape), dtype)
  return x, k, kwargs


def _value_and_grads(x, k, kwargs, grad, impl):
  def loss(x, k):
    y = adderjax.adder_conv(x, k, grad=grad, implementation=impl, **kwargs)
    # A non-uniform cotangent: sin of the (negative) distances.
    return jnp.sum(jnp.sin(y.astype(jnp.float32) / 4)), y
  (_, y), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(x, k)
  return y, grads


def _assert_close(a, b, rtol, atol):
  np.testing.assert_allclose(np.asarray(a, np.float32),
                             np.asarray(b, np.float32), rtol=rtol, atol=atol)


class TestAdderConvInterpret(parameterized.TestCase):

  @parameterized.product(case=tuple(CASES), impl=INTERPRET)
  def test_full_vjp_matches_xla(self, case, impl):
    x, k, kwargs = _inputs(case)
    y, (dx, dk) = _value_and_grads(x, k, kwargs, 'full_precision', impl)
    y0, (dx0, dk0) = _value_and_grads(x, k, kwargs, 'full_precision', 'xla')
    assert y.shape == y0.shape and y.dtype == y0.dtype
    _assert_close(y, y0, 1e-5, 1e-4)
    _assert_close(dx, dx0, 1e-4, 1e-4)
    _assert_close(dk, dk0, 1e-4, 1e-4)

  @parameterized.product(grad=('sign', 'unclipped'), impl=INTERPRET)
  def test_other_grad_modes(self, grad, impl):
    x, k, kwargs = _inputs('valid_s2_groups', seed=1)
    _, (dx, dk) = _value_and_grads(x, k, kwargs, grad, impl)
    _, (dx0, dk0) = _value_and_grads(x, k, kwargs, grad, 'xla')
    _assert_close(dx, dx0, 1e-4, 1e-4)
    _assert_close(dk, dk0, 1e-4, 1e-4)

  @parameterized.parameters(*INTERPRET)
  def test_bf16(self, impl):
    x, k, kwargs = _inputs('same_s1', jnp.bfloat16, seed=2)
    y, (dx, dk) = _value_and_grads(x, k, kwargs, 'full_precision', impl)
    y0, (dx0, dk0) = _value_and_grads(x, k, kwargs, 'full_precision', 'xla')
    assert y.dtype == dx.dtype == dk.dtype == jnp.bfloat16
    # Both accumulate the same bf16 inputs in f32; only the final bf16
    # rounding (and f32 summation order) may differ: 1 bf16 ulp.
    _assert_close(y, y0, 1e-2, 1e-2)
    _assert_close(dx, dx0, 1e-2, 2e-2)
    _assert_close(dk, dk0, 1e-2, 2e-2)

  def test_dense(self):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 3, 10)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(10, 7)), jnp.float32)

    def f(impl):
      return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(
          adderjax.adder_dense(x, w, implementation=impl))), (0, 1)))(x, w)

    (v, g), (v0, g0) = f('pallas_tpu_interpret'), f('xla')
    _assert_close(v, v0, 1e-5, 1e-4)
    for a, b in zip(g, g0):
      _assert_close(a, b, 1e-4, 1e-4)

  def test_vmap_of_grad(self):
    # custom_partitioning has no batching rule: the ops' custom_vmap folds the
    # vmapped axis into G.
    x, k, kwargs = _inputs('valid_s2_groups', seed=4)
    xs = jnp.stack([x, 0.5 * x, -x])

    def per_example(impl):
      def loss(x, k):
        return jnp.sum(jnp.sin(adderjax.adder_conv(
            x, k, implementation=impl, **kwargs)))
      return jax.jit(jax.vmap(jax.value_and_grad(loss, (0, 1)),
                              (0, None)))(xs, k)

    (v, (dx, dk)), (v0, (dx0, dk0)) = (per_example('pallas_gpu_interpret'),
                                       per_example('xla'))
    _assert_close(v, v0, 1e-5, 1e-4)
    _assert_close(dx, dx0, 1e-4, 1e-4)
    _assert_close(dk, dk0, 1e-4, 1e-4)


class TestResolution:

  def test_registered_names_xla_last(self):
    names = adderjax.available_implementations()
    assert names[0] == 'pallas' and names[-1] == 'xla'
    assert set(INTERPRET) <= set(names)

  def test_none_is_chosen_at_lowering(self):
    assert backends.resolve(None, 'cpu') is None
    assert backends.default_for('cpu') == 'xla'
    assert backends.default_for('gpu') == 'pallas'
    assert backends.default_for('cuda') == 'pallas'
    assert backends.default_for('tpu') == 'pallas'

  def test_interpret_only_when_named(self):
    for name in INTERPRET:
      assert backends.resolve(name, 'cpu') == name
      assert backends.get(name).explicit_only

  def test_pallas_on_cpu_is_a_clear_error(self):
    with pytest.raises(ValueError, match=r"'pallas' cannot run here.*GPU or "
                       r"TPU.*'cpu'.*pallas_gpu_interpret"):
      backends.resolve('pallas', 'cpu')
    if jax.default_backend() == 'cpu':
      with pytest.raises(ValueError, match='pallas_tpu_interpret'):
        adderjax.adder_conv(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1)),
                            implementation='pallas')
