"""Adder layer vs convolution vs the official unfold algorithm, per layer.

``python -m experiments.benchmarks.layers`` prints, for the ResNet-20 layer
shapes (batch 64: 32x32x16->16, 16x16x32->32, 8x8x64->64, 3x3 pad 1; the
stride-2 transitions and their 1x1 projection shortcuts) and the LeNet-5-BN
adder layers (batch 256: conv2 5x5 14x14x6->16, fc1 400->120, fc2 120->84):

* forward and forward+backward median time of :func:`adderjax.adder_conv`
  (``implementation='xla'``, full-precision gradients), of
  ``lax.conv_general_dilated`` on the same shapes (``jnp.dot`` for the dense
  layers), and of the official unfold algorithm
  (:mod:`experiments.benchmarks.unfold`);
* the peak memory of each (XLA buffer assignment of the compiled function);
* the ratios adder/conv and unfold/adder.

Forward+backward is ``jax.value_and_grad`` of ``<op(x, w), g>`` for a random
cotangent ``g`` (an argument): one forward and both gradients, as in a train
step (with ``jax.grad`` alone XLA drops the forward, which no gradient reads). Method (interleaved medians
after warm-up, memory analysis): see :mod:`experiments.benchmarks.common`.

Examples:
  python -m experiments.benchmarks.layers            # ~3 minutes
  python -m experiments.benchmarks.layers --quick    # fewer repeats
  python -m experiments.benchmarks.layers --batch 128 --no-unfold
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import adderjax
from experiments import cli
from experiments.benchmarks import common
from experiments.benchmarks import unfold


@dataclasses.dataclass(frozen=True)
class LayerCase:
  """One layer: NHWC input ``x_shape`` and HWIO ``k_shape`` (or a dense
  layer: ``x_shape=(B, K)``, ``k_shape=(K, T)``)."""
  net: str
  name: str
  x_shape: tuple[int, ...]
  k_shape: tuple[int, ...]
  stride: int = 1
  pad: int = 0

  @property
  def dense(self) -> bool:
    return len(self.x_shape) == 2

  @property
  def out_positions(self) -> int:
    if self.dense:
      return self.x_shape[0]
    n, h, w, _ = self.x_shape
    k = self.k_shape[0]
    ho = (h + 2 * self.pad - k) // self.stride + 1
    wo = (w + 2 * self.pad - self.k_shape[1]) // self.stride + 1
    return n * ho * wo

  @property
  def terms(self) -> int:
    """Elementwise terms of the reduction (= MACs of the conv twin)."""
    return self.out_positions * math.prod(self.k_shape)

  @property
  def shape_str(self) -> str:
    if self.dense:
      return f'{self.x_shape[0]}x{self.k_shape[0]}->{self.k_shape[1]}'
    n, h, w, c = self.x_shape
    kh, kw, _, t = self.k_shape
    s = f'/{self.stride}' if self.stride > 1 else ''
    return f'{n}x{h}x{w}x{c}->{t} {kh}x{kw}{s}'


def resnet20_cases(batch: int = 64) -> list[LayerCase]:
  """Distinct adder layers of ResNet-20 (CIFAR, 32x32)."""
  b, net = batch, f'resnet20/b{batch}'
  return [
      LayerCase(net, 'stage1 3x3', (b, 32, 32, 16), (3, 3, 16, 16), 1, 1),
      LayerCase(net, 'stage2 3x3/2', (b, 32, 32, 16), (3, 3, 16, 32), 2, 1),
      LayerCase(net, 'stage2 1x1/2', (b, 32, 32, 16), (1, 1, 16, 32), 2, 0),
      LayerCase(net, 'stage2 3x3', (b, 16, 16, 32), (3, 3, 32, 32), 1, 1),
      LayerCase(net, 'stage3 3x3/2', (b, 16, 16, 32), (3, 3, 32, 64), 2, 1),
      LayerCase(net, 'stage3 1x1/2', (b, 16, 16, 32), (1, 1, 32, 64), 2, 0),
      LayerCase(net, 'stage3 3x3', (b, 8, 8, 64), (3, 3, 64, 64), 1, 1),
  ]


def lenet_cases(batch: int = 256) -> list[LayerCase]:
  """The adder layers of LeNet-5-BN (MNIST, 28x28)."""
  net = f'lenet5/b{batch}'
  return [
      LayerCase(net, 'conv2 5x5', (batch, 14, 14, 6), (5, 5, 6, 16), 1, 0),
      LayerCase(net, 'fc1', (batch, 400), (400, 120)),
      LayerCase(net, 'fc2', (batch, 120), (120, 84)),
  ]


def vgg_small_cases(batch: int = 64) -> list[LayerCase]:
  """The adder layers of VGG-small (CIFAR, 32x32)."""
  b, net = batch, f'vgg_small/b{batch}'
  return [
      LayerCase(net, 'conv2', (b, 32, 32, 128), (3, 3, 128, 128), 1, 1),
      LayerCase(net, 'conv3', (b, 16, 16, 128), (3, 3, 128, 256), 1, 1),
      LayerCase(net, 'conv4', (b, 16, 16, 256), (3, 3, 256, 256), 1, 1),
      LayerCase(net, 'conv5', (b, 8, 8, 256), (3, 3, 256, 512), 1, 1),
      LayerCase(net, 'conv6', (b, 8, 8, 512), (3, 3, 512, 512), 1, 1),
  ]


def resnet50_bottleneck_cases(batch: int = 16) -> list[LayerCase]:
  """One ResNet-50 bottleneck of stage 3 (ImageNet, 14x14x1024)."""
  b, net = batch, f'resnet50/b{batch}'
  return [
      LayerCase(net, 'bottleneck 1x1 in', (b, 14, 14, 1024),
                (1, 1, 1024, 256), 1, 0),
      LayerCase(net, 'bottleneck 3x3', (b, 14, 14, 256), (3, 3, 256, 256),
                1, 1),
      LayerCase(net, 'bottleneck 1x1 out', (b, 14, 14, 256),
                (1, 1, 256, 1024), 1, 0),
  ]


# --- The three implementations ---------------------------------------------


def conv_op(case: LayerCase):
  if case.dense:
    return lambda x, k: jnp.dot(x, k)
  pads = ((case.pad, case.pad),) * 2
  return lambda x, k: lax.conv_general_dilated(
      x, k, (case.stride,) * 2, pads,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def adder_op(case: LayerCase):
  if case.dense:
    return lambda x, k: adderjax.adder_dense(x, k, implementation='xla')
  return lambda x, k: adderjax.adder_conv(x, k, case.stride, case.pad,
                                          implementation='xla')


def unfold_op(case: LayerCase):
  if case.dense:
    return lambda x, k: unfold.adder_unfold(
        x[:, None, None, :], k[None, None], 1, 0)[:, 0, 0, :]
  return lambda x, k: unfold.adder_unfold(x, k, case.stride, case.pad)


def unfold_bytes(case: LayerCase) -> int:
  """Size of the unfold algorithm's broadcast tensor (float32)."""
  return case.terms * 4


def fwd_bwd(op):
  """``(x, k, gy) -> (<y, gy>, (dx, dk))`` for ``y = op(x, k)``.

  One forward and both gradients, as in a train step. The value depends on
  ``y``: with ``jax.grad`` alone XLA would drop the forward pass (neither the
  conv's nor the adder's gradients read ``y``) and time the backward only.
  ``gy`` is an argument, not a closed-over constant: XLA would otherwise
  constant-fold the backward pass's work on it at compile time.
  """
  return jax.value_and_grad(lambda x, k, gy: jnp.vdot(op(x, k), gy),
                            argnums=(0, 1))


def case_inputs(case: LayerCase, dtype=jnp.float32, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=case.x_shape), dtype)
  k = jnp.asarray(rng.normal(size=case.k_shape), dtype)
  y = jax.eval_shape(conv_op(case), x, k)
  gy = jnp.asarray(rng.normal(size=y.shape), dtype)
  return x, k, gy


@dataclasses.dataclass
class LayerResult:
  case: LayerCase
  cands: dict[str, common.Candidate]

  def t(self, name: str) -> float:
    c = self.cands.get(name)
    return c.median_s if c is not None else math.nan

  def mem(self, name: str) -> float:
    c = self.cands.get(name)
    return c.peak_bytes if c is not None else math.nan


def bench_layer(case: LayerCase, *, repeats: int, with_unfold: bool,
                unfold_repeats: int, unfold_max_bytes: float,
                min_time: float = 0.05) -> LayerResult:
  """Times conv / adder (interleaved), then unfold, for one layer."""
  x, k, gy = case_inputs(case)
  cands = [
      common.Candidate('conv_f', conv_op(case), (x, k)),
      common.Candidate('adder_f', adder_op(case), (x, k)),
      common.Candidate('conv_fb', fwd_bwd(conv_op(case)), (x, k, gy)),
      common.Candidate('adder_fb', fwd_bwd(adder_op(case)), (x, k, gy)),
  ]
  common.run_group(cands, repeats=repeats, min_time=min_time)
  out = {c.name: c for c in cands}
  if with_unfold and unfold_bytes(case) <= unfold_max_bytes:
    ucands = [
        common.Candidate('unfold_f', unfold_op(case), (x, k)),
        common.Candidate('unfold_fb', fwd_bwd(unfold_op(case)), (x, k, gy)),
    ]
    # Seconds per call: the first call after compilation is timed too.
    common.run_group(ucands, repeats=unfold_repeats, warmup=0,
                     min_time=min_time)
    out.update({c.name: c for c in ucands})
  return LayerResult(case, out)


def report(results: Sequence[LayerResult], *, title: str) -> str:
  """Time and memory tables with ratios."""
  rows = []
  for r in results:
    rows.append([
        f'{r.case.net} {r.case.name}', r.case.shape_str,
        common.fmt_ms(r.t('conv_f')), common.fmt_ms(r.t('adder_f')),
        common.fmt_ratio(r.t('adder_f'), r.t('conv_f')),
        common.fmt_ms(r.t('conv_fb')), common.fmt_ms(r.t('adder_fb')),
        common.fmt_ratio(r.t('adder_fb'), r.t('conv_fb')),
        common.fmt_ms(r.t('unfold_f')), common.fmt_ms(r.t('unfold_fb')),
        common.fmt_ratio(r.t('unfold_fb'), r.t('adder_fb')),
    ])
  time_table = common.table(
      ['layer', 'shape', 'conv fwd', 'adder fwd', 'adder/conv', 'conv f+b',
       'adder f+b', 'adder/conv', 'unfold fwd', 'unfold f+b',
       'unfold/adder f+b'], rows)
  mrows = []
  for r in results:
    skipped = '' if 'unfold_fb' in r.cands else (
        f' (skipped: {common.fmt_mb(unfold_bytes(r.case))} MB tensor)')
    mrows.append([
        f'{r.case.net} {r.case.name}',
        common.fmt_mb(r.mem('conv_f')), common.fmt_mb(r.mem('adder_f')),
        common.fmt_mb(r.mem('conv_fb')), common.fmt_mb(r.mem('adder_fb')),
        common.fmt_ratio(r.mem('adder_fb'), r.mem('conv_fb')),
        common.fmt_mb(r.mem('unfold_f')),
        common.fmt_mb(r.mem('unfold_fb')) + skipped,
        common.fmt_ratio(r.mem('unfold_fb'), r.mem('adder_fb')),
    ])
  mem_table = common.table(
      ['layer', 'conv fwd', 'adder fwd', 'conv f+b', 'adder f+b',
       'adder/conv f+b', 'unfold fwd', 'unfold f+b', 'unfold/adder f+b'],
      mrows)
  errors = [f'  {r.case.net} {r.case.name} {c.name}: {c.error}'
            for r in results for c in r.cands.values() if c.error]
  text = (f'## {title}: median ms per call\n\n{time_table}\n\n'
          f'## {title}: peak memory, MB (XLA buffer assignment)\n\n'
          f'{mem_table}\n')
  if errors:
    text += '\nerrors:\n' + '\n'.join(errors) + '\n'
  return text


def run_suite(cases: Sequence[LayerCase], *, repeats: int, with_unfold: bool,
              unfold_repeats: int = 3, unfold_max_bytes: float = 1.2e9,
              verbose: bool = True) -> list[LayerResult]:
  results = []
  for case in cases:
    r = bench_layer(case, repeats=repeats, with_unfold=with_unfold,
                    unfold_repeats=unfold_repeats,
                    unfold_max_bytes=unfold_max_bytes)
    if verbose:
      print(f'  {case.net} {case.name}: conv f+b '
            f"{common.fmt_ms(r.t('conv_fb'))} ms, adder f+b "
            f"{common.fmt_ms(r.t('adder_fb'))} ms, unfold f+b "
            f"{common.fmt_ms(r.t('unfold_fb'))} ms", flush=True)
    results.append(r)
  return results


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines this program's flags on ``flag_values``."""
  fv = flag_values
  flags.DEFINE_integer('batch', 64, 'ResNet-20 batch.', lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer('lenet-batch', 256, 'LeNet-5 batch.', lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer('repeats', 9, 'Timed rounds (median).', lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_bool('quick', False, '3 repeats, 1 unfold repeat.',
                    flag_values=fv)
  flags.DEFINE_bool('no-unfold', False, 'Skip the official unfold '
                    'algorithm.', flag_values=fv)


def main(flag_values: flags.FlagValues, args: list[str]) -> None:
  """Times the layers and prints the tables."""
  cli.no_arguments(args)
  fv = flag_values
  repeats = 3 if fv.quick else fv.repeats
  print(common.machine_line(), flush=True)
  cases = resnet20_cases(fv.batch) + lenet_cases(fv['lenet-batch'].value)
  results = run_suite(cases, repeats=repeats,
                      with_unfold=not fv['no-unfold'].value,
                      unfold_repeats=1 if fv.quick else 3)
  print()
  print(report(results, title='Adder layers'))
  print(common.machine_line())


if __name__ == '__main__':
  cli.run(main, define_flags)
