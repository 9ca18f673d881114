r"""Integer inference of a trained run: ``python -m experiments.quantize``.

Restores the newest checkpoint of ``--workdir`` (single process), calibrates
:mod:`adderjax.quant` on a few training batches (deterministic: the first
batches of the run's epoch-0 order), evaluates the float model and the
integer model at every ``--bits`` on the evaluation split, and writes a
markdown report (``WORKDIR/quantize.md`` unless ``--out``): the accuracy
table, the per-layer scale choice, and the energy per image at 45 nm
(Horowitz, ISSCC 2014) of the float network against the integer one.

Example::

  python -m experiments.quantize --workdir workdirs/lenet5_mnist --bits 8,6,4
"""

from __future__ import annotations

import dataclasses
import os
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from adderjax import count_ops
from adderjax import quant
from experiments import checkpointing
from experiments import cli
from experiments import errors
from experiments import experiment
from experiments import steps

#: 45 nm energies in pJ (Horowitz, ISSCC 2014; the figures of
#: adderjax.ops_count plus the 32-bit integer add).
FP32_ADD, FP32_MUL = 0.9, 3.7
INT8_ADD, INT8_MUL = 0.03, 0.2
INT32_ADD = 0.1


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines this program's flags on ``flag_values``."""
  fv = flag_values
  flags.DEFINE_string('workdir', None, 'Run directory (config + checkpoint).',
                      flag_values=fv)
  flags.DEFINE_list('bits', ['8', '6', '4'],
                    'Bit widths of the adder layers (4..8), comma-separated.',
                    flag_values=fv)
  flags.DEFINE_integer('calibration_batches', 4,
                       'Training batches for calibration.', flag_values=fv)
  flags.DEFINE_enum('calibration', 'max', ['max', 'percentile'],
                    'Scale choice (adderjax.quant.QuantConfig).',
                    flag_values=fv)
  flags.DEFINE_float('percentile', 99.99, 'For --calibration=percentile.',
                     flag_values=fv)
  flags.DEFINE_bool('clip_kernel', True,
                    'Clip adder kernels exactly to the activation range '
                    '(adderjax.quant.QuantConfig.clip_kernel).',
                    flag_values=fv)
  flags.DEFINE_list('first_last', ['float', 'int8'],
                    'Precision(s) of the stem and classifier to evaluate.',
                    flag_values=fv)
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: last).',
                       flag_values=fv)
  flags.DEFINE_string('data_dir', None, 'Override dataset.data_dir.',
                      flag_values=fv)
  flags.DEFINE_integer('max_eval_examples', None,
                       'Evaluate on the first N examples only.',
                       flag_values=fv)
  flags.DEFINE_string('out', None, 'Report path (default WORKDIR/'
                      'quantize.md).', flag_values=fv)
  flags.mark_flag_as_required('workdir', flag_values=fv)


def restore(workdir: str, step: int | None = None, data_dir=None,
            max_eval_examples=None):
  """``(config, model, variables, datasets, step)`` of a run's checkpoint."""
  config = experiment.load_run_config(workdir)
  if data_dir is not None:
    config.dataset.data_dir = data_dir
  if max_eval_examples is not None:
    config.dataset.max_eval_examples = max_eval_examples
  exp = experiment.Experiment.from_config(config)
  ckpt = checkpointing.Checkpointer(workdir, primary=False)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {ckpt.directory}.')
  host_state, _ = ckpt.restore(step, exp.init_host_state())
  ckpt.close()
  variables = {'params': host_state.params,
               'batch_stats': host_state.batch_stats}
  return exp.config, exp.model, variables, exp.datasets, int(step)


def accuracy(forward, datasets) -> float:
  """Top-1 accuracy of ``forward(normalized images) -> logits``."""
  hits, count = 0.0, 0.0
  for batch in datasets.eval:
    x = steps.normalize(jnp.asarray(batch['image']), datasets.mean,
                        datasets.std)
    pred = np.asarray(jnp.argmax(forward(x), axis=-1))
    mask = np.asarray(batch['mask'])
    hits += float(np.sum((pred == np.asarray(batch['label'])) * mask))
    count += float(mask.sum())
  return hits / count


@dataclasses.dataclass(frozen=True)
class Energy:
  """Energy per image (pJ) of one way to run the network."""
  name: str
  pj: float
  note: str


def energy_table(model, image_shape, qm) -> list[Energy]:
  """Float network against the integer network, per image at 45 nm.

  Counts come from :func:`adderjax.count_ops` (a subtraction and an
  accumulation per adder tap, a multiply-accumulate per full-precision tap);
  the folded BatchNorm affine of a layer costs one multiply and one add per
  output element. In the integer network an adder tap is one int8
  subtraction and one int32 accumulation (the sum of up to K terms of up to
  255 does not fit 8 bits), or both at the int8 price (the convention of the
  AdderNet literature, an upper bound on the savings).
  """
  report = count_ops(model, image_shape)
  plans = {p.path: p for p in qm.plan}
  rows = {'fp32': 0.0, 'int': 0.0, 'int_lit': 0.0}
  for layer in report.layers:
    plan = plans.get(layer.path)
    outs = int(np.prod(layer.output_shape[1:]))
    affine = outs if plan is not None and plan.bn is not None else 0
    if layer.kind == 'adder':
      rows['fp32'] += layer.ops.add * FP32_ADD
      rows['int'] += layer.macs * (INT8_ADD + INT32_ADD)
      rows['int_lit'] += layer.ops.add * INT8_ADD
      # Integer network: the dequantize/BN affine, one mul + add per output.
      rows['int'] += outs * (FP32_MUL + FP32_ADD)
      rows['int_lit'] += outs * (FP32_MUL + FP32_ADD)
      rows['fp32'] += affine * (FP32_MUL + FP32_ADD)
    else:
      fp = layer.ops.mul * FP32_MUL + layer.ops.add * FP32_ADD
      rows['fp32'] += fp
      if plan is not None and plan.bits is not None:  # int8 stem/classifier
        i8 = layer.macs * (INT8_MUL + INT32_ADD) + outs * (FP32_MUL + FP32_ADD)
        rows['int'] += i8
        rows['int_lit'] += layer.ops.mul * INT8_MUL + layer.ops.add * INT8_ADD
      else:
        rows['int'] += fp
        rows['int_lit'] += fp
  fl = qm.config.first_last
  return [
      Energy('float32 AdderNet', rows['fp32'],
             'fp32 add 0.9 pJ, mul 3.7 pJ; BN as an fp32 affine per output'),
      Energy(f'integer, stem/classifier {fl}', rows['int'],
             'int8 sub 0.03 + int32 accumulate 0.1 pJ per tap; fp32 affine '
             'per output'),
      Energy(f'integer, all adds at int8 price, stem/classifier {fl}',
             rows['int_lit'], 'the literature convention (0.03 pJ per add)'),
  ]


def run(workdir: str, bits_list, *, calibration_batches: int = 4,
        calibration: str = 'max', percentile: float = 99.99,
        clip_kernel: bool = True,
        first_last=('float', 'int8'), step=None, data_dir=None,
        max_eval_examples=None) -> str:
  """Evaluates ``workdir`` in float and integer modes; returns the report.

  Raises:
    experiments.errors.UsageError: a bit width, ``first_last`` value or
      ``calibration_batches`` out of range (a ``ValueError`` too).
  """
  try:
    bits_list = [int(b) for b in bits_list]
    for b in bits_list:
      quant.qmax_of(b)
  except ValueError as e:
    raise errors.UsageError(f'--bits {",".join(map(str, bits_list))}: '
                            f'{e}') from e
  for fl in first_last:
    if fl not in quant.FIRST_LAST:
      raise errors.UsageError(f'first_last must hold values of '
                              f'{quant.FIRST_LAST}, got {fl!r}.')
  if calibration_batches < 1:
    raise errors.UsageError(f'calibration_batches must be positive, got '
                            f'{calibration_batches!r}.')
  config, model, variables, datasets, step = restore(
      workdir, step, data_dir, max_eval_examples)
  t0 = time.perf_counter()
  float_fwd = jax.jit(lambda x: model.apply(variables, x, train=False))
  results = [('float32', '-', accuracy(float_fwd, datasets))]
  batches = [steps.normalize(jnp.asarray(datasets.train.batch(i)['image']),
                             datasets.mean, datasets.std)
             for i in range(calibration_batches)]
  try:
    base = quant.calibrate(model, variables, batches, quant.QuantConfig(
        bits=8, calibration=calibration, percentile=percentile))
  except ValueError as e:  # a model the integer path does not cover
    raise errors.UserError(f'{workdir}: {e}') from e
  models_by_key = {}
  for fl in first_last:
    for b in bits_list:
      qm = base.requantize(quant.QuantConfig(
          bits=b, calibration=calibration, percentile=percentile,
          first_last=fl, clip_kernel=clip_kernel))
      models_by_key[(b, fl)] = qm
      results.append((f'int{b} adders', fl, accuracy(qm, datasets)))
  elapsed = time.perf_counter() - t0
  float_acc = results[0][2]
  n = datasets.eval.num_examples
  lines = [
      f'# Integer inference of `{workdir}` (checkpoint step {step})', '',
      f'{config.model.name} ({config.model.kind}), {config.dataset.name} '
      f'{config.dataset.eval_split} ({n} images). Calibration: '
      f'{calibration_batches} training batches of {config.batch_size}, '
      f'`{calibration}`'
      + (f' ({percentile}th percentile)' if calibration == 'percentile'
         else '') + ('; adder kernels clipped exactly to the activation '
                     'range' if clip_kernel else '; scale covers the kernel '
                     '(clip_kernel=False)')
      + f'; {elapsed:.0f} s for calibration and evaluation.', '',
      '| model | stem / classifier | top-1 | vs float |', '|---|---|---|---|']
  for name, fl, acc in results:
    delta = '' if fl == '-' else f'{100 * (acc - float_acc):+.2f}'
    lines.append(f'| {name} | {fl} | {100 * acc:.2f} % | {delta} |')
  for fl in first_last:
    qm = models_by_key[(bits_list[0], fl)]
    lines += ['', f'Per-layer scales at {bits_list[0]} bits, stem and '
              f'classifier {fl}:', '', qm.table()]
  qm = models_by_key[(bits_list[0], first_last[-1])]
  lines += ['', f'Energy per image at 45 nm (stem and classifier '
            f'{first_last[-1]}):', '', '| network | energy | pricing |',
            '|---|---|---|']
  fp = None
  for e in energy_table(model, datasets.image_shape, qm):
    fp = fp or e.pj
    lines.append(f'| {e.name} | {e.pj / 1e6:.4f} uJ ({fp / e.pj:.1f}x less '
                 f'than float) | {e.note} |' if e.pj != fp else
                 f'| {e.name} | {e.pj / 1e6:.4f} uJ | {e.note} |')
  return '\n'.join(lines) + '\n'


def main(flag_values: flags.FlagValues, args: list[str]) -> None:
  """Writes and prints the report of ``--workdir``."""
  cli.no_arguments(args)
  fv = flag_values
  out = fv.out or os.path.join(fv.workdir, 'quantize.md')
  cli.check_workdir(os.path.dirname(out) or '.', '--out')
  report = run(fv.workdir, fv.bits,
               calibration_batches=fv.calibration_batches,
               calibration=fv.calibration, percentile=fv.percentile,
               clip_kernel=fv.clip_kernel,
               first_last=tuple(fv.first_last), step=fv.step,
               data_dir=fv.data_dir, max_eval_examples=fv.max_eval_examples)
  with open(out, 'w') as f:
    f.write(report)
  print(report)
  print(f'written to {out}')


if __name__ == '__main__':
  cli.run(main, define_flags)
