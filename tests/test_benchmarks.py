"""The benchmarks measure what they say they measure.

Speed itself is not tested (see ``experiments/benchmarks``); what is tested
here is that each timed candidate computes the function it stands for: the
unfold baseline (the official code's algorithm) and the benchmark's adder
layer against the independent numpy oracle of the paper's equations, the
floor's loop kernels against numpy, and the sizes the reports quote against
arithmetic by hand. A tiny end-to-end run checks the report and the targets
table are produced.
"""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import floor
from experiments.benchmarks import layers
from experiments.benchmarks import run
from experiments.benchmarks import unfold
import adder_oracle as oracle

# (x_shape NHWC, kernel HWIO, stride, pad)
_UNFOLD_CASES = {
    '3x3_same': ((2, 6, 6, 3), (3, 3, 3, 4), 1, 1),
    '3x3_stride2': ((2, 7, 7, 2), (3, 3, 2, 5), 2, 1),
    '1x1_stride2': ((3, 8, 8, 4), (1, 1, 4, 6), 2, 0),
    '5x5_valid': ((1, 9, 9, 2), (5, 5, 2, 3), 1, 0),
}


def _inputs(x_shape, k_shape, seed=0):
  rng = np.random.default_rng(seed)
  # Half-scale inputs put many |w - x| inside and many outside [-1, 1].
  x = (0.7 * rng.normal(size=x_shape)).astype(np.float32)
  k = rng.normal(size=k_shape).astype(np.float32)
  return x, k


class UnfoldBaselineTest(parameterized.TestCase):

  @parameterized.named_parameters(
      *[(name,) + case for name, case in _UNFOLD_CASES.items()])
  def test_forward_and_paper_gradients_match_oracle(self, x_shape, k_shape,
                                                    stride, pad):
    x, k = _inputs(x_shape, k_shape)
    y = unfold.adder_unfold(jnp.asarray(x), jnp.asarray(k), stride, pad)
    strides, pads = (stride, stride), [(pad, pad), (pad, pad)]
    expected = oracle.forward(x, k, strides, pads, (1, 1), 1)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-4)
    gy = np.random.default_rng(1).normal(size=expected.shape).astype(
        np.float32)
    dx, dk = jax.grad(
        lambda a, b: jnp.vdot(unfold.adder_unfold(a, b, stride, pad), gy),
        argnums=(0, 1))(jnp.asarray(x), jnp.asarray(k))
    edx, edk = oracle.grads(x, k, gy, strides, pads, (1, 1), 1,
                            'full_precision')
    np.testing.assert_allclose(dx, edx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dk, edk, rtol=1e-4, atol=1e-3)

  def test_broadcast_bytes_is_the_official_tensor_size(self):
    # ResNet-20 stage 1 at batch 64: C_out x C_in*9 x N*32*32 floats.
    self.assertEqual(
        unfold.broadcast_bytes((64, 32, 32, 16), (3, 3, 16, 16), 1, 1),
        16 * (16 * 9) * (64 * 32 * 32) * 4)
    # 1x1 stride 2: 16x16 output positions per example.
    self.assertEqual(
        unfold.broadcast_bytes((64, 32, 32, 16), (1, 1, 16, 32), 2, 0),
        32 * 16 * (64 * 16 * 16) * 4)


class LayerCandidatesTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('conv_stride2', layers.LayerCase('t', 'c', (2, 8, 8, 3), (3, 3, 3, 4),
                                        2, 1)),
      ('conv_1x1', layers.LayerCase('t', 'c', (2, 8, 8, 4), (1, 1, 4, 6), 2,
                                    0)),
      ('dense', layers.LayerCase('t', 'fc', (5, 12), (12, 7))),
  )
  def test_timed_functions_compute_the_layer(self, case):
    x, k, gy = layers.case_inputs(case)
    x, k = np.asarray(x), np.asarray(k)
    if case.dense:
      expected = -np.abs(x[:, :, None] - k[None]).sum(axis=1)
    else:
      s, p = case.stride, case.pad
      expected = oracle.forward(x, k, (s, s), [(p, p), (p, p)], (1, 1), 1)
    candidates = {'adder': layers.adder_op(case),
                  'unfold': layers.unfold_op(case)}
    for name, op in candidates.items():
      np.testing.assert_allclose(jax.jit(op)(x, k), expected, rtol=1e-5,
                                 atol=1e-4, err_msg=name)
    # The f+b candidate is value_and_grad of <op(x, k), gy>: its value is
    # that inner product (so the forward is not dropped by XLA).
    value, _ = jax.jit(layers.fwd_bwd(layers.adder_op(case)))(x, k, gy)
    np.testing.assert_allclose(value, np.vdot(expected, np.asarray(gy)),
                               rtol=1e-4)

  def test_terms_by_hand(self):
    # ResNet-20 stage 2 3x3/2 at batch 64: 64*16*16 positions x 9*16*32.
    case = layers.LayerCase('r', 's', (64, 32, 32, 16), (3, 3, 16, 32), 2, 1)
    self.assertEqual(case.out_positions, 64 * 16 * 16)
    self.assertEqual(case.terms, 64 * 16 * 16 * 9 * 16 * 32)
    self.assertEqual(case.shape_str, '64x32x32x16->32 3x3/2')


class FloorTest(parameterized.TestCase):

  @parameterized.parameters('fma', 'max', 'abs', 'clip')
  def test_loop_kernels_compute_their_terms(self, form):
    rng = np.random.default_rng(3)
    m, t, u = 8, 16, floor._U  # pylint: disable=protected-access
    x = rng.normal(size=(u, m)).astype(np.float32)
    g = rng.normal(size=(u, m)).astype(np.float32)
    w = rng.normal(size=(u, t)).astype(np.float32)
    acc = np.zeros((m, t), np.float32)
    xs, ws, gs = x[:, :, None], w[:, None, :], g[:, :, None]
    terms = {'fma': xs * ws, 'max': np.maximum(xs, ws),
             'abs': np.abs(xs - ws),
             'clip': gs * np.clip(ws, xs - 1.0, xs + 1.0)}[form]
    expected = floor._PASSES * terms.sum(axis=0)  # pylint: disable=protected-access
    got = jax.jit(floor._loop_kernel(form))(acc, x, w, g)  # pylint: disable=protected-access
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)

  def test_floor_ratios_by_hand(self):
    fl = floor.Floor({'matmul': 100.0, 'loop max': 80.0, 'loop clip': 50.0})
    self.assertAlmostEqual(fl.forward_ratio(), 1.25)
    # Per 100 G terms: forward loop 1.25 + input-gradient loop 2 + weight
    # gradient matmul 1, against three matmuls: 4.25 / 3.
    self.assertAlmostEqual(fl.fwd_bwd_ratio(), 4.25 / 3)


class EndToEndTest(absltest.TestCase):

  def test_tiny_layer_run_reports_ratios_and_targets(self):
    cases = [layers.LayerCase('resnet20/b2', 'stage1 3x3', (2, 8, 8, 4),
                              (3, 3, 4, 4), 1, 1)]
    results = layers.run_suite(cases, repeats=1, with_unfold=True,
                               unfold_repeats=1, verbose=False)
    r = results[0]
    for name in ('conv_f', 'adder_f', 'conv_fb', 'adder_fb', 'unfold_fb'):
      self.assertGreater(r.t(name), 0.0, name)
      self.assertGreater(r.mem(name), 0.0, name)
    text = layers.report(results, title='tiny')
    self.assertIn('resnet20/b2 stage1 3x3', text)
    self.assertIn('8x8x4->4 3x3', text)
    table, data = run.targets(results, [])
    self.assertIn('worst ResNet-20 layer f+b adder/conv (resnet20/b2, '
                  'stage1 3x3)', table)
    self.assertIn('min unfold/adder f+b time, 3x3 layers', data)


if __name__ == '__main__':
  absltest.main()
