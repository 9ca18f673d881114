"""experiments.quantize end to end: a tiny training run by the library, then
integer evaluation of its checkpoint (slow: trains an adder LeNet-5-BN)."""

from __future__ import annotations

import re

import pytest

from experiments import quantize
from experiments import testing
from experiments import train
from experiments.configs import lenet5_mnist


@pytest.mark.slow
def test_tiny_training_run_int8_matches_float(tmp_path):
  data_dir = testing.write_synthetic_mnist(str(tmp_path / 'mnist'), 256, 200)
  c = lenet5_mnist.get_config('runlocal,adder')
  c.dataset.data_dir = data_dir
  c.batch_size = 32
  c.eval_batch_size = 40
  c.steps_per_epoch = 8
  c.num_epochs = 4
  c.progress_bar = False
  c.dataset.prefetch = 1
  c.dataset.max_eval_examples = -1
  c.optimizer.learning_rate = 0.05
  workdir = str(tmp_path / 'run')
  summary = train.train_and_evaluate(c, workdir)
  assert summary['eval']['top1'] > 0.5  # learned something (chance 0.1)
  report = quantize.run(workdir, [8, 4], calibration_batches=2,
                        first_last=('float', 'int8'))
  rows = dict(re.findall(r'\| (float32 \| -|int\d adders \| \w+) \| '
                         r'([\d.]+) %', report))
  assert float(rows['float32 | -']) == pytest.approx(
      100 * summary['eval']['top1'], abs=1e-6)
  for fl in ('float', 'int8'):
    # 200 test images: one image is 0.5 points.
    assert abs(float(rows[f'int8 adders | {fl}']) -
               float(rows['float32 | -'])) <= 1.0
  assert '| conv2 | adder | 8 |' in report
  assert 'Energy per image' in report


def test_run_rejects_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match='got 3'):
    quantize.run(str(tmp_path), [8, 3])
  with pytest.raises(ValueError, match='calibration_batches'):
    quantize.run(str(tmp_path), [8], calibration_batches=0)
