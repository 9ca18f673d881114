"""Adder attention vs dot-product attention: forward + backward, per length.

``python -m experiments.benchmarks.attention`` compares, at sequence lengths
64 to 1024 (``--lengths``; ``[batch, length, heads, head_dim]`` inputs,
self-attention):

* ``adder``: :func:`adderjax.attention.attention` with ``score='l1'``,
  ``identity='output'``, the default ``'full_precision'`` gradient and
  ``implementation=None`` (the XLA backend on CPU, the Pallas Mosaic kernels
  on TPU): the l1 scores are one grouped adder convolution, no
  ``[B, H, Lq, Lk, D]`` tensor is built;
* ``dot``: ``jax.nn.dot_product_attention`` (its default XLA
  implementation).

Both are timed as forward + backward: ``jax.value_and_grad`` of
``<attn(q, k, v), g>`` with respect to ``q``, ``k`` and ``v`` for a random
cotangent ``g`` (an argument, so XLA neither drops the forward nor folds
the backward at compile time), as :mod:`experiments.benchmarks.layers` does.

Parts (``--parts``):

* ``cpu``: on this host, the median wall time of one call after warm-up,
  the two candidates interleaved round by round
  (:func:`experiments.benchmarks.common.run_group`), and XLA's memory
  analysis of the compiled function: ``temp`` (scratch buffers) and the peak
  ``temp + argument + output - alias``
  (:func:`experiments.benchmarks.common.memory_of`); ratios adder / dot.
* ``tpu``: the same functions compiled ahead of time for one chip of a TPU
  topology (``--topology``, default ``v5e:2x4``) through libtpu, in a
  subprocess with :data:`experiments.aot.TPU_COMPILE_ENV`, and read with
  :func:`experiments.aot.analyse`: temp bytes (HBM), cost-analysis FLOPs and
  bytes accessed (the Mosaic kernels report their own
  ``pl.CostEstimate``: 3 FLOPs per l1 term forward), and the number of
  Mosaic kernels in the HLO (3: the scores forward and the query and key
  gradients). A length whose compile fails gets its error line in the table.
  XLA puts intermediates that fit in on-chip memory (v5e: 128 MiB of VMEM)
  outside HBM, so the TPU temp is 0 until the per-chip batch makes them
  large: the TPU part has its own ``--tpu-batch`` (default 16). Skipped
  (with a line saying so) when libtpu is not installed.

Examples:
  python -m experiments.benchmarks.attention               # a few minutes
  python -m experiments.benchmarks.attention --quick       # 3 repeats, short
  python -m experiments.benchmarks.attention --parts cpu --lengths 64,128 \\
      --batch 1 --json attention.json
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from adderjax import attention
from experiments import aot
from experiments import cli
from experiments import errors
from experiments.benchmarks import common

#: Default sequence lengths.
LENGTHS = (64, 128, 256, 512, 1024)
#: Parts of the benchmark.
PARTS = ('cpu', 'tpu')
#: Prefix of the TPU subprocess' result lines.
_RESULT = 'TPU_RESULT '
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Case:
  """Self-attention inputs ``[batch, length, heads, head_dim]``."""
  batch: int
  length: int
  heads: int = 4
  head_dim: int = 64
  dtype: str = 'float32'

  @property
  def shape(self) -> tuple[int, int, int, int]:
    return (self.batch, self.length, self.heads, self.head_dim)

  @property
  def l1_terms(self) -> int:
    """``|q - k|`` terms of the scores: ``B H L^2 D``."""
    return self.batch * self.heads * self.length ** 2 * self.head_dim

  @property
  def scores_bytes(self) -> int:
    """Size of one float32 ``[B, H, L, L]`` score or weight array."""
    return 4 * self.batch * self.heads * self.length ** 2

  @property
  def broadcast_bytes(self) -> int:
    """Size of the ``[B, H, Lq, Lk, D]`` float32 tensor (not built)."""
    return 4 * self.l1_terms


def adder_attention(q, k, v):
  """The benchmarked adder attention (library defaults but the score)."""
  return attention.attention(q, k, v, score='l1', identity='output',
                             grad='full_precision', implementation=None)


def dot_attention(q, k, v):
  """The baseline: ``jax.nn.dot_product_attention`` (XLA)."""
  return jax.nn.dot_product_attention(q, k, v)


#: Candidates, in the order they run and are reported.
OPS = {'dot': dot_attention, 'adder': adder_attention}


def fwd_bwd(op):
  """``(q, k, v, g) -> (<op(q, k, v), g>, (dq, dk, dv))``.

  Examples:
    >>> x = jnp.ones((1, 4, 2, 8))
    >>> value, grads = fwd_bwd(adder_attention)(x, x, x, x)
    >>> float(value), [d.shape for d in grads]
    (64.0, [(1, 4, 2, 8), (1, 4, 2, 8), (1, 4, 2, 8)])
  """
  def scalar(q, k, v, g):
    out = op(q, k, v).astype(jnp.float32)
    return jnp.vdot(out, g.astype(jnp.float32))
  return jax.value_and_grad(scalar, argnums=(0, 1, 2))


def case_inputs(case: Case, seed: int = 0) -> tuple[jax.Array, ...]:
  """Random ``q, k, v`` and the cotangent ``g``, standard normal."""
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=case.shape), case.dtype)
               for _ in range(4))


def _error_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines() or ['']
  return f'{type(e).__name__}: {lines[0][:160]}'


# --- CPU: time and memory ---------------------------------------------------


def bench_cpu(case: Case, *, repeats: int, warmup: int = 2,
              min_time: float = 0.02) -> dict[str, Any]:
  """Times and measures both candidates at one length (interleaved).

  Returns:
    ``{'case': ..., name: {'ms', 'peak_mb', 'temp_mb', 'argument_mb',
    'output_mb', 'gflops', 'bytes_accessed_gb', 'error'}}`` for ``name`` in
    :data:`OPS`; NaN (and ``error``) for a candidate that failed.
  """
  args = case_inputs(case)
  cands = [common.Candidate(name, fwd_bwd(op), args)
           for name, op in OPS.items()]
  common.run_group(cands, repeats=repeats, warmup=warmup, min_time=min_time)
  out = {'case': dataclasses.asdict(case)}
  for c in cands:
    row = {'ms': c.median_s * 1e3, 'times_ms': [t * 1e3 for t in c.times],
           'peak_mb': c.peak_bytes / 2**20, 'error': c.error}
    if not c.error:
      # aot.analyse needs the executable, which run_group does not keep.
      row.update(aot.analyse(jax.jit(c.fn).lower(*c.args).compile()))
    out[c.name] = row
  return out


def cpu_report(rows: Sequence[dict[str, Any]], repeats: int) -> str:
  """The CPU table: time, peak and temp memory, ratios adder / dot."""
  cells = []
  for r in rows:
    d, a = r['dot'], r['adder']
    get = lambda row, key: row.get(key, math.nan)
    mb = lambda row, key: common.fmt_mb(get(row, key) * 2**20)
    cells.append([
        str(r['case']['length']),
        common.fmt_ms(d['ms'] / 1e3), common.fmt_ms(a['ms'] / 1e3),
        common.fmt_ratio(a['ms'], d['ms']),
        mb(d, 'peak_mb'), mb(a, 'peak_mb'),
        common.fmt_ratio(a['peak_mb'], d['peak_mb']),
        mb(d, 'temp_mb'), mb(a, 'temp_mb'),
        common.fmt_ratio(get(a, 'temp_mb'), get(d, 'temp_mb')),
        common.fmt_mb(Case(**r['case']).broadcast_bytes)])
  c = rows[0]['case'] if rows else {}
  head = (f"### CPU, forward + backward (batch {c.get('batch')}, heads "
          f"{c.get('heads')}, head_dim {c.get('head_dim')}, "
          f"{c.get('dtype')}; median ms of {repeats} interleaved rounds "
          'after warm-up; peak = XLA temp + argument + output, MB)')
  table = common.table(
      ['L', 'dot ms', 'adder ms', 'adder/dot', 'dot peak MB',
       'adder peak MB', 'adder/dot peak', 'dot temp MB', 'adder temp MB',
       'adder/dot temp', '[B,H,L,L,D] MB (not built)'], cells)
  errs = [f"  L={r['case']['length']} {name}: {r[name]['error']}"
          for r in rows for name in OPS if r[name].get('error')]
  text = f'{head}\n\n{table}\n'
  if errs:
    text += '\nerrors:\n' + '\n'.join(errs) + '\n'
  return text


# --- TPU: ahead-of-time compile --------------------------------------------


def compile_tpu(case: Case, topology: str) -> dict[str, Any]:
  """Compiles both candidates for one chip of ``topology``; per-op stats.

  Runs inside the libtpu process (:data:`experiments.aot.TPU_COMPILE_ENV`).
  A failed compile gives ``{'error': line}`` for that candidate.
  """
  out = {'case': dataclasses.asdict(case)}
  try:
    device = aot.tpu_topology(topology)[0]
  except Exception as e:  # pylint: disable=broad-except
    return {**out, 'error': _error_line(e)}
  out['device_kind'] = device.device_kind
  spec = jax.ShapeDtypeStruct(
      case.shape, jnp.dtype(case.dtype),
      sharding=jax.sharding.SingleDeviceSharding(device))
  for name, op in OPS.items():
    try:
      compiled = jax.jit(fwd_bwd(op)).trace(spec, spec, spec, spec).lower(
      ).compile()
      out[name] = aot.analyse(compiled)
    except Exception as e:  # pylint: disable=broad-except
      out[name] = {'error': _error_line(e)}
  return out


def run_tpu_subprocess(cases: Sequence[Case], topology: str,
                       timeout_s: float) -> list[dict[str, Any]]:
  """Runs :func:`compile_tpu` for ``cases`` in a libtpu subprocess.

  Each case prints its result as it finishes; cases the subprocess did not
  reach (a crash, the timeout) get the subprocess' last error line.
  """
  if importlib.util.find_spec('libtpu') is None:
    return [{'case': dataclasses.asdict(c),
             'skipped': 'libtpu is not installed (pip install '
                        f'"jax[tpu]=={jax.__version__}")'} for c in cases]
  env = dict(os.environ, **aot.TPU_COMPILE_ENV)
  env['PYTHONPATH'] = os.pathsep.join(
      [_REPO] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
  c0 = cases[0]
  argv = [sys.executable, '-m', 'experiments.benchmarks.attention',
          '--tpu-child', '--parts', 'tpu', '--topology', topology,
          '--lengths', ','.join(str(c.length) for c in cases),
          '--tpu-batch', str(c0.batch), '--heads', str(c0.heads),
          '--head-dim', str(c0.head_dim), '--dtype', c0.dtype]
  try:
    proc = subprocess.run(argv, cwd=_REPO, env=env, capture_output=True,
                          text=True, timeout=timeout_s, check=False)
    stdout, stderr = proc.stdout, proc.stderr
    failure = (f'TPU subprocess exited with status {proc.returncode}'
               if proc.returncode else 'TPU subprocess gave no result')
  except subprocess.TimeoutExpired as e:
    stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (
        e.stdout or '')
    stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (
        e.stderr or '')
    failure = f'TPU subprocess timed out after {timeout_s:.0f} s'
  done = {}
  for line in stdout.splitlines():
    if line.startswith(_RESULT):
      r = json.loads(line[len(_RESULT):])
      done[r['case']['length']] = r
  last = [l for l in stderr.strip().splitlines()
          if l.strip() and 'Error' in l][-1:] or stderr.strip().splitlines(
          )[-1:]
  reason = failure + (f': {last[0].strip()[:160]}' if last else '')
  return [done.get(c.length) or {'case': dataclasses.asdict(c),
                                 'error': reason} for c in cases]


def tpu_report(rows: Sequence[dict[str, Any]], topology: str) -> str:
  """The TPU table: temp, FLOPs, bytes accessed, Mosaic kernels; ratios."""
  cells = []
  kind = next((r['device_kind'] for r in rows if 'device_kind' in r), '?')
  for r in rows:
    length = str(r['case']['length'])
    failed = r.get('skipped') or r.get('error') or ' / '.join(
        f'{name}: {r[name]["error"]}' for name in OPS
        if 'error' in r.get(name, {}))
    if failed:
      cells.append([length, ('skipped: ' if r.get('skipped') else 'error: ')
                    + failed] + [''] * 11)
      continue
    d, a = r['dot'], r['adder']
    cells.append([
        length, common.fmt_mb(Case(**r['case']).scores_bytes),
        common.fmt_mb(d['temp_mb'] * 2**20),
        common.fmt_mb(a['temp_mb'] * 2**20),
        common.fmt_ratio(a['temp_mb'], d['temp_mb']),
        f"{d['gflops']:.3g}", f"{a['gflops']:.3g}",
        common.fmt_ratio(a['gflops'], d['gflops']),
        f"{d['bytes_accessed_gb']:.3g}", f"{a['bytes_accessed_gb']:.3g}",
        common.fmt_ratio(a['bytes_accessed_gb'], d['bytes_accessed_gb']),
        str(d['mosaic_calls']), str(a['mosaic_calls'])])
  c = rows[0]['case'] if rows else {}
  head = (f"### TPU AOT compile, forward + backward ({topology}, one chip: "
          f"{kind}; batch {c.get('batch')}, heads {c.get('heads')}, head_dim "
          f"{c.get('head_dim')}, {c.get('dtype')}; XLA memory_analysis temp "
          '(HBM) and cost_analysis)')
  table = common.table(
      ['L', '[B,H,L,L] MB', 'dot temp MB', 'adder temp MB', 'adder/dot temp',
       'dot GFLOP', 'adder GFLOP', 'adder/dot FLOP', 'dot GB accessed',
       'adder GB accessed', 'adder/dot bytes', 'dot Mosaic calls',
       'adder Mosaic calls'], cells)
  return f'{head}\n\n{table}\n'


# --- Entry point -------------------------------------------------------------


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines this program's flags on ``flag_values``."""
  fv = flag_values
  cli.define_list('lengths', list(LENGTHS), 'Sequence lengths.', fv,
                  item=int)
  cli.define_list('parts', list(PARTS), 'Parts: cpu (time and memory '
                  'here), tpu (AOT compile for --topology).', fv)
  flags.DEFINE_integer('batch', 2, 'CPU part batch.', lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer('tpu-batch', 16, 'TPU part batch (per chip).',
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer('heads', 4, 'Attention heads.', lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer('head-dim', 64, 'Features per head.', lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                    'Input dtype.', flag_values=fv)
  flags.DEFINE_integer('repeats', 7, 'Timed rounds (median).', lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer('warmup', 2, 'Untimed calls after compiling.',
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_bool('quick', False, '3 repeats, lengths 64,256 unless '
                    '--lengths is given.', flag_values=fv)
  flags.DEFINE_string('topology', 'v5e:2x4', 'TPU topology (one chip of it '
                      'is compiled for).', flag_values=fv)
  flags.DEFINE_integer('tpu-timeout', 1800, 'Seconds for the TPU '
                       'subprocess.', lower_bound=1, flag_values=fv)
  flags.DEFINE_string('json', None, 'Also write every number to this path.',
                      flag_values=fv)
  flags.DEFINE_bool('tpu-child', False, 'Internal: this is the libtpu '
                    'subprocess of the tpu part.', flag_values=fv)


def _options(fv: flags.FlagValues) -> dict[str, Any]:
  """The flags' values, checked, ``--quick`` applied."""
  opts = {name.replace('-', '_'): fv[name].value for name in (
      'lengths', 'parts', 'batch', 'tpu-batch', 'heads', 'head-dim', 'dtype',
      'repeats', 'warmup', 'quick', 'topology', 'tpu-timeout', 'json',
      'tpu-child')}
  bad = [p for p in opts['parts'] if p not in PARTS]
  if bad or not opts['parts']:
    raise errors.UsageError(f'--parts {",".join(opts["parts"])}: unknown '
                            f'{bad}; choose from {", ".join(PARTS)}')
  bad = [n for n in opts['lengths'] if n < 1]
  if bad or not opts['lengths']:
    raise errors.UsageError(f'--lengths: must be positive integers, got '
                            f'{opts["lengths"]}')
  if opts['quick']:
    opts['repeats'] = min(opts['repeats'], 3)
    if not fv['lengths'].present:
      opts['lengths'] = [64, 256]
  return opts


def main(flag_values: flags.FlagValues, args: list[str]) -> None:
  """Runs the parts asked for and prints their tables."""
  cli.no_arguments(args)
  run(_options(flag_values))


def run(opts: dict[str, Any]) -> dict[str, Any]:
  """The benchmark for checked options (:func:`main`); returns the numbers."""
  cases = lambda batch: [Case(batch, n, opts['heads'], opts['head_dim'],
                              opts['dtype']) for n in opts['lengths']]
  if opts['tpu_child']:
    for case in cases(opts['tpu_batch']):
      print(_RESULT + json.dumps(compile_tpu(case, opts['topology'])),
            flush=True)
    return {'tpu': []}
  print(common.machine_line(), flush=True)
  results = {'machine': common.machine_info(), 'options': opts, 'cpu': [],
             'tpu': []}
  if 'cpu' in opts['parts']:
    for case in cases(opts['batch']):
      r = bench_cpu(case, repeats=opts['repeats'], warmup=opts['warmup'])
      print(f"  L={case.length}: dot {common.fmt_ms(r['dot']['ms'] / 1e3)} "
            f"ms, adder {common.fmt_ms(r['adder']['ms'] / 1e3)} ms",
            flush=True)
      results['cpu'].append(r)
    print('\n' + cpu_report(results['cpu'], opts['repeats']), flush=True)
  if 'tpu' in opts['parts']:
    results['tpu'] = run_tpu_subprocess(cases(opts['tpu_batch']),
                                        opts['topology'], opts['tpu_timeout'])
    print(tpu_report(results['tpu'], opts['topology']), flush=True)
  print(common.machine_line())
  if opts['json']:
    with open(opts['json'], 'w') as f:
      json.dump(results, f, indent=1, default=float)
    print(f'raw numbers: {opts["json"]}')
  return results


if __name__ == '__main__':
  cli.run(main, define_flags)
