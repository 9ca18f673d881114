"""The machine's floor: multiply-add vs l1 throughput of this CPU under XLA.

``python -m experiments.benchmarks.floor`` measures, on cache-resident data:

* ``matmul``: a float32 ``jnp.dot`` (XLA hands it to its matmul library):
  the multiply-add rate a convolution can reach.
* XLA fused vector loops of the shape of the adder kernels (an ``[M, T]``
  accumulator, ``T`` the vector axis, a scalar of ``x`` broadcast against a
  row of ``w``; 36 terms per fused step, 16 steps per call, all in cache),
  per term:

  - ``loop fma``: ``x * w`` (one fused multiply-add: what a convolution would
    cost written as the same loop),
  - ``loop max``: ``max(x, w)`` (one max + one add: the adder forward pass,
    through ``-|x - w| = x + w - 2 max(x, w)``),
  - ``loop |x-w|``: ``|x - w|`` (sub + abs + add: the textbook form),
  - ``loop clip``: ``g * min(max(w, x - 1), x + 1)`` (max + min + fma: the
    HardTanh input gradient).

Rates are in G terms/s (one term = one multiply-add or one ``|x - w|`` of the
reduction). :func:`floor_ratios` turns them into the lowest adder/conv time
ratio this machine allows: forward ``rate(matmul) / rate(loop max)``;
forward+backward ``(1/max + 1/clip + 1/matmul) / (3/matmul)`` (the adder's
weight gradient is a matmul, like all three conv passes).
"""

from __future__ import annotations

import dataclasses

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from experiments.benchmarks import common

_U = 36  # terms per fused step
_PASSES = 16  # fused steps per call (a fori_loop), data stays in cache


def _tree(parts):
  parts = list(parts)
  while len(parts) > 1:
    nxt = [parts[i] + parts[i + 1] for i in range(0, len(parts) - 1, 2)]
    if len(parts) % 2:
      nxt.append(parts[-1])
    parts = nxt
  return parts[0]


def _loop_kernel(form: str):
  def f(acc, x, w, g):
    parts = []
    for j in range(_U):
      xj, wj = x[j][:, None], w[j][None, :]
      if form == 'fma':
        parts.append(xj * wj)
      elif form == 'max':
        parts.append(jnp.where(xj > wj, xj, wj))
      elif form == 'abs':
        parts.append(jnp.abs(xj - wj))
      elif form == 'clip':
        gj = g[j][:, None]
        lo, hi = xj - 1.0, xj + 1.0
        m = jnp.where(wj > lo, wj, lo)
        parts.append(gj * jnp.where(m < hi, m, hi))
    return acc + _tree(parts)

  def passes(acc, x, w, g):
    return jax.lax.fori_loop(0, _PASSES, lambda i, a: f(a, x, w, g), acc)
  return passes


@dataclasses.dataclass
class Floor:
  rates: dict[str, float]  # G terms / s

  def forward_ratio(self) -> float:
    return self.rates['matmul'] / self.rates['loop max']

  def fwd_bwd_ratio(self) -> float:
    mm, mx, cl = (self.rates['matmul'], self.rates['loop max'],
                  self.rates['loop clip'])
    return (1 / mx + 1 / cl + 1 / mm) / (3 / mm)


def measure(*, repeats: int = 7, m: int = 2048, t: int = 16,
            mm: int = 512) -> Floor:
  """Measures the rates (see module docstring)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(_U, m)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(_U, m)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(_U, t)), jnp.float32)
  acc = jnp.zeros((m, t), jnp.float32)
  a = jnp.asarray(rng.normal(size=(mm, mm)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(mm, mm)), jnp.float32)
  cands = [common.Candidate('matmul', jnp.dot, (a, b))]
  for form, name in (('fma', 'loop fma'), ('max', 'loop max'),
                     ('abs', 'loop |x-w|'), ('clip', 'loop clip')):
    cands.append(common.Candidate(name, _loop_kernel(form), (acc, x, w, g)))
  common.run_group(cands, repeats=repeats, min_time=0.05)
  terms = {'matmul': mm ** 3}
  rates = {}
  for c in cands:
    n = terms.get(c.name, _U * m * t * _PASSES)
    rates[c.name] = n / c.median_s / 1e9
  return Floor(rates)


def report(fl: Floor) -> str:
  rows = [[name, f'{rate:.1f}', common.fmt_ratio(fl.rates['matmul'], rate)]
          for name, rate in fl.rates.items()]
  text = common.table(['kernel', 'G terms/s', 'matmul / kernel'], rows)
  return (f'{text}\n\nfloor of adder/conv time: forward '
          f'{fl.forward_ratio():.2f}x, forward+backward '
          f'{fl.fwd_bwd_ratio():.2f}x\n')


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines this program's flags on ``flag_values``."""
  flags.DEFINE_integer('repeats', 9, 'Timed rounds (median).', lower_bound=1,
                       flag_values=flag_values)


def main(flag_values: flags.FlagValues, args: list[str]) -> None:
  """Measures and prints the floor."""
  cli.no_arguments(args)
  print(common.machine_line(), flush=True)
  print('\n## Machine floor (G terms/s, cache-resident)\n')
  print(report(measure(repeats=flag_values.repeats)))


if __name__ == '__main__':
  cli.run(main, define_flags)
