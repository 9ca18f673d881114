"""Peak memory of adder layers and AddNN train steps against their conv twins.

XLA's buffer assignment of a compiled executable is exact and deterministic,
so unlike speed (``experiments/benchmarks``) memory can be checked in tests.
The reference is the same computation with ``lax.conv_general_dilated`` (or
the CNN model): the issue's bounds are an AddNN train step within 1.5x of the
CNN's peak and, per layer, forward+backward within 3x of the convolution's.
The official unfold algorithm is 10-180x the convolution on these layers.
"""

from absl.testing import absltest
from absl.testing import parameterized
import jax

from experiments.benchmarks import common
from experiments.benchmarks import layers
from experiments.benchmarks import models


def _peak(fn, *args) -> float:
  return common.memory_of(jax.jit(fn).lower(*args).compile())


def _layer_cases():
  cases = layers.resnet20_cases(8) + layers.lenet_cases(8)
  return [(f'{c.net}_{c.name}'.replace(' ', '_').replace('/', '_'), c)
          for c in cases]


class LayerMemoryTest(parameterized.TestCase):

  @parameterized.named_parameters(*_layer_cases())
  def test_forward_backward_peak_within_3x_of_conv(self, case):
    x, k, gy = layers.case_inputs(case)
    conv = _peak(layers.fwd_bwd(layers.conv_op(case)), x, k, gy)
    adder = _peak(layers.fwd_bwd(layers.adder_op(case)), x, k, gy)
    self.assertLessEqual(adder, 3.0 * conv,
                         f'{case.net} {case.name}: adder {adder / 2**20:.2f} '
                         f'MB vs conv {conv / 2**20:.2f} MB')

  @parameterized.named_parameters(
      (n, c) for n, c in _layer_cases() if c.k_shape[:2] == (1, 1))
  def test_one_tap_layer_holds_no_unrolled_terms(self, case):
    # A 1x1 layer needs no stride phases: its forward+backward holds what the
    # conv's does plus one output-sized accumulator. Materialised l1 terms
    # (one buffer per input feature, as a YNNPACK reduce fusion would make
    # of an unfenced forward) exceed this several times over.
    x, k, gy = layers.case_inputs(case)
    conv = _peak(layers.fwd_bwd(layers.conv_op(case)), x, k, gy)
    adder = _peak(layers.fwd_bwd(layers.adder_op(case)), x, k, gy)
    self.assertLessEqual(adder, 1.5 * conv)


class TrainStepMemoryTest(parameterized.TestCase):

  @parameterized.named_parameters(('lenet5_bn', 'lenet5_bn', 32),
                                  ('resnet20', 'resnet20', 16))
  def test_addnn_train_step_peak_within_1_5x_of_cnn(self, model, batch):
    peaks = {}
    for kind in ('cnn', 'adder'):
      step, args = models.make_train_step(model, kind, batch, 'float32')
      peaks[kind] = _peak(step, *args)
    self.assertLessEqual(peaks['adder'], 1.5 * peaks['cnn'], str(peaks))


if __name__ == '__main__':
  absltest.main()
