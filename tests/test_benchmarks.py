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

import contextlib
import io
import json
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from experiments.benchmarks import floor
from experiments.benchmarks import kernels
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


class KernelsBenchmarkTest(absltest.TestCase):
  """``python -m experiments.benchmarks.kernels --quick`` on CPU."""

  def test_quick_run_reports_time_and_memory_per_layer_and_step(self):
    if jax.default_backend() != 'cpu':
      self.skipTest('the CPU path (no Pallas column)')
    out = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, 'kernels.json')
      with contextlib.redirect_stdout(out):
        rc = cli.call(kernels.main, kernels.define_flags,
                      ['--quick', '--layers', 'stage2 3x3/2', '--json', path])
      with open(path) as f:
        data = json.load(f)
    self.assertEqual(rc, 0)
    text = out.getvalue()
    self.assertIn('Pallas columns are skipped on cpu', text)
    for title in ('### Layers, forward (', '### Layers, forward + backward',
                  '### Train steps'):
      self.assertIn(title, text)
    self.assertIn('| layer | M | K | T | conv ms | xla ms | conv temp MB | '
                  'xla temp MB | args+out MB | xla/conv | xla/conv temp |',
                  text)
    self.assertIn('| net | model | batch | step ms | images/s | temp MB | '
                  'args MB | GB accessed | GFLOP | time/cnn | temp/cnn | '
                  'bytes/cnn |', text)
    self.assertIn('| resnet20 | adder (xla) | 2 |', text)
    mib = 2**20
    # ResNet-20 stage 2 3x3/2 at batch 1: x 1x32x32x16, kernel 3x3x16x32,
    # output 1x16x16x32, all f32.
    x_bytes, k_bytes, y_bytes = 32 * 32 * 16 * 4, 9 * 16 * 32 * 4, 256 * 32 * 4
    (fwd,), (fwd_bwd,) = data['layers_forward'], data[
        'layers_forward_backward']
    self.assertEqual((fwd['m'], fwd['k'], fwd['t']), (256, 144, 32))
    for row in (fwd, fwd_bwd):
      for kind in ('conv', 'xla'):
        self.assertGreater(row[f'{kind}_ms'], 0.0)
        self.assertEqual(row[f'{kind}_argument_mb'] * mib, x_bytes + k_bytes)
      # The XLA adder materialises the patches (K M floats) at least.
      self.assertGreater(row['xla_temp_mb'], 0.0)
    for kind in ('conv', 'xla'):
      self.assertEqual(fwd[f'{kind}_output_mb'] * mib, y_bytes)
      # value_and_grad: the scalar sum, dx and dk.
      self.assertGreaterEqual(fwd_bwd[f'{kind}_output_mb'] * mib,
                              4 + x_bytes + k_bytes)
    steps = data['steps']
    self.assertEqual([(r['kind'], r['implementation']) for r in steps],
                     [('cnn', None), ('adder', 'xla')])
    for row in steps:
      self.assertEqual(row['batch'], 2)
      self.assertAlmostEqual(row['images_per_s'], 2e3 / row['step_ms'],
                             places=6)
      for key in ('temp_mb', 'argument_mb', 'bytes_accessed_gb', 'gflops'):
        self.assertGreater(row[key], 0.0, key)

  def test_bad_flags_name_the_bad_value(self):
    for argv, bad in ((['--layers', 'stage9 3x3'], 'stage9 3x3'),
                      (['--parts', 'layers,kernels'], 'kernels'),
                      (['--step-batch-cifar', '0'], '0')):
      err = io.StringIO()
      with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as e:
        cli.call(kernels.main, kernels.define_flags, argv)
      self.assertEqual(e.exception.code, 2)
      self.assertIn(bad, err.getvalue())
      self.assertTrue(err.getvalue().startswith('error: '))
      self.assertEqual(err.getvalue().count('\n'), 1)


if __name__ == '__main__':
  absltest.main()
