"""Integer adder inference against float adder and float conv, forward only.

``python -m experiments.benchmarks.quant`` times, in one process and
interleaved (:mod:`experiments.benchmarks.common`: median after warm-up),
the inference forward pass (BatchNorm in eval mode) of

* ``conv``: the CNN version of the model (``lax.conv``, oneDNN on CPU);
* ``adder f32``: the AdderNet in float32 (``adderjax.adder_conv``, the
  patch-free XLA kernels);
* ``adder int8``: the same AdderNet quantized by :mod:`adderjax.quant`
  with its defaults (int8 operands, ``sum x + sum w - 2 sum max(x, w)``: two
  vector operations per term, int16 partial sums, int32 accumulators, folded
  BN; stem and classifier float as in the paper);
* ``int8 abs/i16``: the same with ``method='abs'`` (``sum |x - w|``: three
  operations per term);
* ``int8 abs/i32``: ``'abs'`` with int32 partial sums (half the SIMD lanes
  of int16: shows what the vector width buys);

for LeNet-5-BN and ResNet-20 at batch 64 and 256, and the same four for one
ResNet-20 3x3 layer (16 -> 16 channels, 32x32) on its own.

Examples:
  python -m experiments.benchmarks.quant
  python -m experiments.benchmarks.quant --models lenet5_bn --batches 64
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from adderjax import adder_conv
from adderjax import models
from adderjax import quant
from adderjax.ops import integer
from experiments import cli
from experiments.benchmarks import common

CANDIDATES = ('conv', 'adder f32', 'adder int8', 'int8 abs/i16',
              'int8 abs/i32')


def _variables(model, x):
  """Random-init variables with BN statistics of ``x`` (eval mode is then
  a sensible network, so the int8 activations use their whole range)."""
  v = jax.jit(lambda k, x: model.init(k, x, train=False))(
      jax.random.key(0, impl='rbg'), x)
  if 'batch_stats' not in v:
    return v
  _, state = jax.jit(lambda v, x: model.apply(
      v, x, train=True, mutable=['batch_stats']))(v, x)
  stats = jax.tree.map(lambda new, old: (new - 0.9 * old) / 0.1,
                       state['batch_stats'], v['batch_stats'])
  return {'params': v['params'], 'batch_stats': stats}


def model_candidates(name: str, batch: int, seed: int = 0):
  """The four forward passes of one zoo model at one batch size."""
  h, w, c = models.INPUT_SHAPES[name]
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch, h, w, c)), jnp.float32)
  cands = []
  cnn = models.create_model(name, kind='cnn', num_classes=10)
  vc = _variables(cnn, x[:32])
  cands.append(common.Candidate(
      'conv', lambda v, x: cnn.apply(v, x, train=False), (vc, x)))
  add = models.create_model(name, kind='adder', num_classes=10)
  va = _variables(add, x[:32])
  cands.append(common.Candidate(
      'adder f32', lambda v, x: add.apply(v, x, train=False), (va, x)))
  qm = quant.calibrate(add, va, [x[:32]], quant.QuantConfig(bits=8))
  cands.append(common.Candidate('adder int8', qm.apply, (qm.qparams, x)))
  for name, method, pdt in (('int8 abs/i16', 'abs', 'int16'),
                            ('int8 abs/i32', 'abs', 'int32')):
    qv = qm.requantize(quant.QuantConfig(bits=8, method=method,
                                         partial_dtype=pdt))
    cands.append(common.Candidate(name, qv.apply, (qv.qparams, x)))
  return cands


def layer_candidates(batch: int, seed: int = 0):
  """One ResNet-20 3x3 layer (16 -> 16, 32x32, padding 1)."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch, 32, 32, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 16, 16)), jnp.float32)
  xq = jnp.asarray(rng.integers(-127, 128, size=x.shape), jnp.int8)
  kq = jnp.asarray(rng.integers(-127, 128, size=k.shape), jnp.int8)
  pads = ((1, 1), (1, 1))
  conv = lambda x, k: lax.conv_general_dilated(
      x, k, (1, 1), pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return [
      common.Candidate('conv', conv, (x, k)),
      common.Candidate('adder f32', lambda x, k: adder_conv(x, k, 1, pads),
                       (x, k)),
      common.Candidate('adder int8', lambda x, k: integer.adder_conv_int(
          x, k, 1, pads), (xq, kq)),
      common.Candidate('int8 abs/i16', lambda x, k: integer.adder_conv_int(
          x, k, 1, pads, method='abs'), (xq, kq)),
      common.Candidate('int8 abs/i32', lambda x, k: integer.adder_conv_int(
          x, k, 1, pads, method='abs', partial_dtype='int32'), (xq, kq)),
  ]


def report(rows: Sequence[tuple[str, int, Sequence[common.Candidate]]]
           ) -> str:
  out = []
  for label, batch, cands in rows:
    by = {c.name: c for c in cands}
    conv = by['conv'].median_s
    add = by['adder f32'].median_s
    out.append([label, batch] + [common.fmt_ms(by[n].median_s)
                                 for n in CANDIDATES] + [
        common.fmt_ratio(by['adder int8'].median_s, add),
        common.fmt_ratio(by['adder int8'].median_s, conv),
        common.fmt_ratio(add, conv)])
  text = common.table(
      ['forward', 'batch', 'conv ms', 'adder f32 ms', 'adder int8 ms',
       'int8 abs/i16 ms', 'int8 abs/i32 ms', 'int8 / f32 adder',
       'int8 / conv', 'f32 adder / conv'], out)
  errors = [f'  {label} b{batch} {c.name}: {c.error}'
            for label, batch, cands in rows for c in cands if c.error]
  if errors:
    text += '\n\nerrors:\n' + '\n'.join(errors)
  return text + '\n'


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines this program's flags on ``flag_values``."""
  fv = flag_values
  cli.define_list('models', ['lenet5_bn', 'resnet20'], 'Zoo models.', fv)
  cli.define_list('batches', [64, 256], 'Batch sizes.', fv, item=int)
  flags.DEFINE_integer('repeats', 5, 'Timed rounds (median).', lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_bool('no_layer', False, 'Skip the single-layer rows.',
                    flag_values=fv)


def main(flag_values: flags.FlagValues, args: list[str]) -> None:
  """Times the forward passes and prints the table."""
  cli.no_arguments(args)
  fv = flag_values
  print(common.machine_line(), flush=True)
  rows = []
  cases = [(m, b) for m in fv.models for b in fv.batches]
  if not fv.no_layer:
    cases += [('resnet20 3x3 layer 16->16 32x32', b) for b in fv.batches]
  for label, batch in cases:
    cands = (layer_candidates(batch) if 'layer' in label
             else model_candidates(label, batch))
    common.run_group(cands, repeats=fv.repeats, warmup=2, min_time=0.05)
    print(f'  {label} b{batch}: ' + ', '.join(
        f'{c.name} {common.fmt_ms(c.median_s)} ms' for c in cands),
          flush=True)
    rows.append((label, batch, cands))
  print()
  print('## Inference forward (BN eval mode), median ms per batch\n')
  print(report(rows))
  print(common.machine_line())


if __name__ == '__main__':
  cli.run(main, define_flags)
