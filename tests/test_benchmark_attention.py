"""``python -m experiments.benchmarks.attention`` keeps running (CPU part).

Speed is not tested; a tiny run checks the table and the JSON are produced,
that the timed candidates compute attention and its gradients, that the
adder candidate's memory stays far under the ``[B, H, L, L, D]`` tensor it
does not build, and that bad flags are one-line usage errors.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from adderjax import attention as adder_attention
from experiments import cli
from experiments.benchmarks import attention


class AttentionBenchmarkTest(absltest.TestCase):

  def test_tiny_cpu_run_prints_the_table_and_writes_the_numbers(self):
    out = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, 'attention.json')
      with contextlib.redirect_stdout(out):
        rc = cli.call(attention.main, attention.define_flags,
                      ['--parts', 'cpu', '--lengths', '16,64', '--batch', '1',
                       '--heads', '2', '--head-dim', '32', '--repeats', '1',
                       '--warmup', '1', '--json', path])
      with open(path) as f:
        data = json.load(f)
    self.assertEqual(rc, 0)
    text = out.getvalue()
    self.assertIn('### CPU, forward + backward (batch 1, heads 2, head_dim '
                  '32, float32;', text)
    self.assertIn('| L  | dot ms | adder ms | adder/dot |', text)
    self.assertNotIn('errors:', text)
    self.assertEqual(data['tpu'], [])
    self.assertEqual([r['case']['length'] for r in data['cpu']], [16, 64])
    for row in data['cpu']:
      case = attention.Case(**row['case'])
      in_bytes = 4 * 4 * case.batch * case.length * case.heads * case.head_dim
      for name in ('dot', 'adder'):
        r = row[name]
        self.assertEqual(r['error'], '')
        self.assertGreater(r['ms'], 0.0)
        # q, k, v and the cotangent in; the scalar and three gradients out.
        self.assertEqual(r['argument_mb'] * 2**20, in_bytes)
        self.assertGreaterEqual(r['output_mb'] * 2**20, 0.75 * in_bytes)
        self.assertAlmostEqual(
            r['peak_mb'],
            r['temp_mb'] + r['argument_mb'] + r['output_mb'], places=6)
    # L=64: the l1 scores never hold [B, H, L, L, D] (1 MiB here).
    big = data['cpu'][1]
    self.assertLess(big['adder']['temp_mb'] * 2**20,
                    attention.Case(**big['case']).broadcast_bytes / 4)

  def test_candidates_compute_attention_and_its_gradients(self):
    case = attention.Case(1, 6, 2, 4)
    q, k, v, g = attention.case_inputs(case)
    for op, ref in (
        (attention.adder_attention,
         lambda q, k, v: adder_attention.attention(q, k, v)),
        (attention.dot_attention, lambda q, k, v: jnp.einsum(
            'bhqk,bkhd->bqhd', jax.nn.softmax(jnp.einsum(
                'bqhd,bkhd->bhqk', q, k) / 2.0), v))):
      value, grads = attention.fwd_bwd(op)(q, k, v, g)
      ref_value, ref_grads = jax.value_and_grad(
          lambda q, k, v, ref=ref: jnp.vdot(ref(q, k, v), g),
          argnums=(0, 1, 2))(q, k, v)
      np.testing.assert_allclose(value, ref_value, rtol=1e-5)
      for a, b in zip(grads, ref_grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

  def test_tpu_table_keeps_a_failed_length_as_its_error_line(self):
    case = dict(batch=2, length=64, heads=4, head_dim=64, dtype='float32')
    stats = dict(temp_mb=0.0, gflops=1.0, bytes_accessed_gb=0.5,
                 mosaic_calls=0)
    rows = [
        {'case': case, 'device_kind': 'TPU v5 lite', 'dot': stats,
         'adder': dict(stats, gflops=1.5, mosaic_calls=3)},
        {'case': dict(case, length=128), 'device_kind': 'TPU v5 lite',
         'dot': stats, 'adder': {'error': 'JaxRuntimeError: no VMEM'}},
        {'case': dict(case, length=256),
         'error': 'TPU subprocess timed out after 9 s'}]
    text = attention.tpu_report(rows, 'v5e:2x4')
    self.assertIn('one chip: TPU v5 lite; batch 2', text)
    cells = {line.split('|')[1].strip(): [c.strip() for c in
                                           line.split('|')[2:-1]]
             for line in text.splitlines() if line.startswith('| ')}
    # [B,H,L,L] MB, temps, temp ratio, GFLOPs, FLOP ratio, ..., kernels.
    self.assertEqual(cells['64'][:7],
                     ['0.12', '0.00', '0.00', '-', '1', '1.5', '1.50x'])
    self.assertEqual(cells['64'][-2:], ['0', '3'])
    self.assertEqual(cells['128'][0],
                     'error: adder: JaxRuntimeError: no VMEM')
    self.assertEqual(cells['256'][0],
                     'error: TPU subprocess timed out after 9 s')

  def test_bad_flags_name_the_bad_value(self):
    for argv, bad in ((['--parts', 'cpu,gpu'], 'gpu'),
                      (['--lengths', '0'], '0'),
                      (['--batch', '0'], '0')):
      err = io.StringIO()
      with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as e:
        cli.call(attention.main, attention.define_flags, argv)
      self.assertEqual(e.exception.code, 2)
      self.assertIn(bad, err.getvalue())
      self.assertTrue(err.getvalue().startswith('error: '))
      self.assertEqual(err.getvalue().count('\n'), 1)


if __name__ == '__main__':
  absltest.main()
