"""Smoke test of ``python -m experiments.benchmarks.kernels`` on CPU."""

from __future__ import annotations

import io

import pytest

from experiments import cli
from experiments.benchmarks import kernels


@pytest.mark.slow
def test_cpu_run_times_conv_and_xla_and_says_pallas_needs_accelerator(capsys):
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != 'cpu':
    pytest.skip('CPU behaviour')
  out = io.StringIO()
  rows = kernels.run(['resnet20'], {'resnet20': 1, 'resnet50': 1},
                     ['conv', 'xla'], repeats=1, dtype='float32',
                     backward=True, out=out)
  assert len(rows) == 6 and all(r['conv_ms'] > 0 and r['xla_ms'] > 0
                                for r in rows)
  assert 'xla/conv' in out.getvalue()
  # The (M, K, T) bookkeeping: 3x3 stride-2 layer on a 32x32x16 input.
  assert (rows[2]['m'], rows[2]['k'], rows[2]['t']) == (256, 144, 32)
  assert cli.call(kernels.main, kernels.define_flags,
                  ['--roofline', '--nets', 'resnet50']) == 0
  text = capsys.readouterr().out
  assert 'roofline, H100' in text and 'roofline, TPU v5e' in text


def test_interpret_check_matches_xla():
  assert kernels.interpret_check(out=io.StringIO()) < 1e-4


def test_roofline_model_is_compute_bound_where_expected():
  layer = kernels.LAYERS[-1]  # ResNet-50 conv5 3x3: K=4608, T=512.
  r = kernels.roofline(layer, 64, kernels.H100)
  m, k, t = layer.mkt(64)
  assert r['adder_fwd'] == pytest.approx(1e6 * 2 * m * k * t / 33.5e12)
  assert r['adder_fwd'] > 10 * r['conv_fwd']
