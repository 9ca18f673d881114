"""Shared machinery of the speed/memory benchmarks: timing, memory, tables.

Method (every benchmark here):

* **Time**: each candidate is compiled and run ``warmup`` times first; then
  ``repeats`` rounds run every candidate of a group once per round,
  interleaved (``a b c a b c ...``), so a load spike from another process hits
  all of them alike. A candidate faster than ``min_time`` is called several
  times per sample. The reported figure is the **median** wall-clock time of
  one call (``block_until_ready`` included).
* **Memory**: the peak of XLA's buffer assignment for the compiled executable
  (``compiled.memory_analysis()``): ``temp + argument + output - alias`` bytes.
  It is exact for what XLA allocates for one call (inputs and outputs
  included, code and runtime overheads excluded), deterministic, and needs no
  separate process per candidate.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax


@dataclasses.dataclass
class Candidate:
  """One function to time: ``fn(*args)`` (jitted by :func:`run_group`)."""
  name: str
  fn: Callable[..., Any]
  args: tuple
  compile_s: float = math.nan
  peak_bytes: float = math.nan
  times: list = dataclasses.field(default_factory=list)
  inner: int = 1
  error: str = ''

  @property
  def median_s(self) -> float:
    return statistics.median(self.times) if self.times else math.nan


def memory_of(compiled) -> float:
  """Peak bytes of a compiled executable's buffer assignment."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return math.nan
  if m is None:
    return math.nan
  return float(m.temp_size_in_bytes + m.argument_size_in_bytes +
               m.output_size_in_bytes - m.alias_size_in_bytes)


def compile_candidate(c: Candidate) -> Callable[..., Any] | None:
  """Lowers and compiles ``c`` (recording compile time and peak memory)."""
  t0 = time.perf_counter()
  try:
    compiled = jax.jit(c.fn).lower(*c.args).compile()
  except Exception as e:  # pylint: disable=broad-except
    c.error = f'{type(e).__name__}: {str(e).splitlines()[0][:120]}'
    return None
  c.compile_s = time.perf_counter() - t0
  c.peak_bytes = memory_of(compiled)
  return compiled


def run_group(cands: Sequence[Candidate], *, repeats: int = 7,
              warmup: int = 2, min_time: float = 0.02,
              time_budget: float | None = None) -> Sequence[Candidate]:
  """Compiles, warms up and times ``cands`` interleaved (see module doc).

  Args:
    cands: the candidates; their ``times`` are filled in (seconds per call).
    repeats: timed rounds.
    warmup: untimed calls per candidate after compilation; with 0, the
      first call is timed too (for slow candidates, seconds per call).
    min_time: a sample lasts at least this long (calls are repeated).
    time_budget: stop adding rounds (after the third) once the group has
      used this many seconds of timing.

  Returns:
    ``cands``.
  """
  compiled = {}
  for c in cands:
    exe = compile_candidate(c)
    if exe is None:
      continue
    try:
      t0 = time.perf_counter()
      jax.block_until_ready(exe(*c.args))
      first = time.perf_counter() - t0
      if warmup == 0:
        c.times.append(first)
      for _ in range(max(warmup - 1, 0)):
        jax.block_until_ready(exe(*c.args))
    except Exception as e:  # pylint: disable=broad-except
      c.error = f'{type(e).__name__}: {str(e).splitlines()[0][:120]}'
      continue
    c.inner = max(1, min(50, int(min_time / max(first, 1e-6))))
    compiled[c.name] = exe
  start = time.perf_counter()
  for r in range(repeats - (1 if warmup == 0 else 0)):
    for c in cands:
      exe = compiled.get(c.name)
      if exe is None:
        continue
      t0 = time.perf_counter()
      for _ in range(c.inner):
        out = exe(*c.args)
      jax.block_until_ready(out)
      c.times.append((time.perf_counter() - t0) / c.inner)
    if (time_budget is not None and r >= 2 and
        time.perf_counter() - start > time_budget):
      break
  return cands


def load_average() -> tuple[float, float, float]:
  try:
    return os.getloadavg()
  except OSError:
    return (math.nan,) * 3


def machine_info() -> dict[str, Any]:
  """CPU model, core count, load, date, library versions."""
  model = platform.processor() or platform.machine()
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True,
                         check=False).stdout
    for line in out.splitlines():
      if line.startswith('Model name:'):
        model = line.split(':', 1)[1].strip()
  except OSError:
    pass
  return {
      'cpu': model,
      'cores': os.cpu_count(),
      'load': load_average(),
      'date': datetime.datetime.now().strftime('%Y-%m-%d %H:%M'),
      'jax': jax.__version__,
      'backend': jax.default_backend(),
      'devices': len(jax.devices()),
  }


def machine_line() -> str:
  m = machine_info()
  load = ', '.join(f'{v:.2f}' for v in m['load'])
  return (f"# machine: {m['cpu']}, {m['cores']} cores, {m['backend']} "
          f"({m['devices']} device), jax {m['jax']}, {m['date']}, "
          f'load average {load}')


def fmt_ms(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '-'
  ms = seconds * 1e3
  if ms >= 100:
    return f'{ms:.0f}'
  if ms >= 10:
    return f'{ms:.1f}'
  return f'{ms:.2f}'


def fmt_mb(nbytes: float) -> str:
  if not math.isfinite(nbytes):
    return '-'
  mb = nbytes / 2**20
  if mb >= 100:
    return f'{mb:.0f}'
  if mb >= 10:
    return f'{mb:.1f}'
  return f'{mb:.2f}'


def fmt_ratio(a: float, b: float) -> str:
  if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
    return '-'
  r = a / b
  return f'{r:.1f}x' if r >= 10 else f'{r:.2f}x'


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A Markdown table (right-aligned numbers)."""
  cells = [[str(h) for h in header]] + [[str(v) for v in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  def line(r):
    return '| ' + ' | '.join(v.rjust(w) if i else v.ljust(w)
                             for i, (v, w) in enumerate(zip(r, widths))) + ' |'
  sep = '|' + '|'.join('-' * (w + 1) + ':' if i else '-' * (w + 2)
                       for i, w in enumerate(widths)) + '|'
  return '\n'.join([line(cells[0]), sep] + [line(r) for r in cells[1:]])
