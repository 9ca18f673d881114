r"""The device check: one command that checks and times the library on a GPU.

``python -m experiments.benchmarks.device_check OUTDIR`` runs five pieces and
writes ``OUTDIR/device_check.md`` (a summary table and one table per piece)
and ``OUTDIR/device_check.json`` (every number), printing progress as it goes:

* ``kernel_check``: the Pallas kernels through the public op
  (:func:`adderjax.ops.adder_conv`, ``implementation='pallas'``: Triton on a
  GPU) against the XLA backend (``implementation='xla'``) on every distinct
  conv layer of ResNet-20 (batch 128) and ResNet-50 (batch 64)
  (:data:`experiments.benchmarks.kernels.LAYERS`): the forward output and
  both gradients (``dX``, ``dW`` by ``jax.vjp``), each within
  ``|pallas - xla| <= 2e-5 |xla| + 2e-6 R`` where ``R`` is the size of its
  reduction (``K = kh kw C_in`` terms per output, ``kh kw C_out`` per input
  element, ``M = N H_out W_out`` per weight).
* ``kernel_timing``: on the same shapes, the median time of the forward and of
  forward + backward (``jax.vjp``: the output and both gradients) of
  ``lax.conv_general_dilated`` (cuDNN), the XLA adder backend, the Pallas
  kernels and the official unfold algorithm
  (:mod:`experiments.benchmarks.unfold`, where its broadcast tensor fits),
  timed interleaved after warm-up by :func:`experiments.benchmarks.common.
  run_group`, as ratios, beside the H100 roofline model
  (:func:`experiments.benchmarks.kernels.roofline`).
* ``train_step_cnn``, ``train_step_adder``: the ResNet-20 CIFAR-10 train step
  of the experiments (``Experiment.from_config(config, data=False)``, the
  library's default implementation) at batch 128 and 256: images/s and peak
  memory (``memory_stats()['peak_bytes_in_use']`` of the device where it has
  one, else XLA's memory analysis of the compiled step), AddNN / CNN.
* ``mnist``: a short run of the main job
  (:func:`experiments.train.train_and_evaluate`, ``lenet5_mnist.py``, 40
  steps and the final evaluation) on ``data/mnist``; a row says so when the
  data is not there.

Each piece runs in a worker process (``--isolate``, the default), so that a
kernel that crashes the process or poisons the GPU context costs only its own
piece, and each piece's peak memory is its own. Inside a worker each layer,
batch or run is tried on its own: a failure (e.g. a kernel that does not
compile) is a row with the one-line error. The whole run stays under
``--time_limit`` seconds (default 345, compilation included): the time left
is shared among the pieces still to run (weights 3, 4, 2, 3.5, 1.5); a piece
that runs out skips its remaining rows (``skipped: time budget``) and a
worker that overruns is stopped. ``OUTDIR/device_check_logs/`` keeps each
worker's stderr and records.

Without a GPU or TPU (or with ``--smoke``, which also pins the workers to the
CPU) it runs the smoke mode: tiny versions of a few layers, the Pallas
kernels in interpret mode (``implementation='pallas_gpu_interpret'``), the
small ResNet-20 (``runlocal``) at batch 4 and 3 MNIST steps on synthetic
data (``--smoke`` runs them in one worker, without XLA's expensive
optimisations), so the test suite proves the command before a GPU appears.

Exit status: 0 when every row is ``ok`` or skipped, 1 when a row failed (the
files are written either way), 2 for a usage error.

Examples:
  python -m experiments.benchmarks.device_check /tmp/dc          # on a GPU
  make device-check OUT=/tmp/dc                                  # the same
  python -m experiments.benchmarks.device_check /tmp/dc --smoke  # CPU smoke
  python -m experiments.benchmarks.device_check /tmp/dc --pieces kernel_check
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import adderjax
from experiments import cli
from experiments import errors
from experiments import experiment
from experiments import steps
from experiments import testing
from experiments import train
from experiments.benchmarks import common
from experiments.benchmarks import kernels
from experiments.benchmarks import unfold
from experiments.configs import lenet5_mnist
from experiments.configs import resnet20_cifar10

#: The pieces, in the order they run.
PIECES = ('kernel_check', 'kernel_timing', 'train_step_cnn',
          'train_step_adder', 'mnist')
#: Each piece's share of the time left when it starts.
WEIGHTS = {'kernel_check': 3.0, 'kernel_timing': 4.0, 'train_step_cnn': 2.0,
           'train_step_adder': 3.5, 'mnist': 1.5}
#: Default wall-clock limit of the whole run (seconds).
TIME_LIMIT = 345.0
#: Seconds kept back at the end (writing the files, stopping a worker).
RESERVE = 10.0
#: How long a worker may overrun its last piece's deadline.
GRACE = 15.0
#: A worker is not started with less time than this left.
MIN_START = 5.0

#: Kernel check tolerance: ``|a - b| <= RTOL |b| + ATOL * reduction``.
RTOL = 2e-5
ATOL = 2e-6

SKIPPED_BUDGET = 'skipped: time budget'
MD_FILE = 'device_check.md'
JSON_FILE = 'device_check.json'
LOG_DIR = 'device_check_logs'
MNIST_DIR = 'data/mnist'

#: Interpreted Pallas kernels are big XLA:CPU programs: the smoke mode
#: compiles its own (check) functions without the expensive optimisations.
_FAST_COMPILE = {'xla_backend_optimization_level': 0,
                 'xla_llvm_disable_expensive_passes': True}

#: XLA_FLAGS added for the workers of ``--smoke`` (the same, process-wide).
SMOKE_XLA_FLAGS = ('--xla_backend_optimization_level=0 '
                   '--xla_llvm_disable_expensive_passes=true')

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


# ----------------------------------------------------------------------------
# Settings of the two modes.


@dataclasses.dataclass(frozen=True)
class Settings:
  """What one mode runs.

  Attributes:
    mode: ``'full'`` (GPU/TPU) or ``'smoke'`` (CPU).
    kernel_backend: the backend checked against ``'xla'``.
    check_layers: ``(layer, batch)`` pairs of the kernel check.
    timing_layers: ``(layer, batch)`` pairs of the kernel timing.
    repeats: timed rounds per layer (median).
    warmup: untimed calls after compilation.
    min_time: a timed sample lasts at least this long (seconds).
    group_seconds: a layer's timing rounds stop (after the third) past this.
    unfold_max_bytes: the unfold baseline is skipped above this broadcast
      tensor size.
    train_config_arg: the ResNet-20 config's argument.
    train_batches: train-step batch sizes, ascending.
    step_samples: timed samples per train step (median).
    mnist_steps: steps of the MNIST run.
    fast_compile: compile the kernel check with :data:`_FAST_COMPILE`.
  """
  mode: str
  kernel_backend: str
  check_layers: tuple
  timing_layers: tuple
  repeats: int
  warmup: int
  min_time: float
  group_seconds: float
  unfold_max_bytes: float
  train_config_arg: str | None
  train_batches: tuple[int, ...]
  step_samples: int
  mnist_steps: int
  fast_compile: bool


#: Layer batches of the full mode (those of docs/roofline.md).
FULL_BATCHES = {'resnet20': 128, 'resnet50': 64}
#: The layers of the smoke mode (shrunk by :func:`shrink`).
SMOKE_CHECK = (('resnet20', 'stage2 3x3/2'), ('resnet50', 'conv4 1x1 out'))
SMOKE_TIMING = (('resnet50', 'conv4 1x1 out'),)


def shrink(layer: kernels.Layer) -> kernels.Layer:
  """A tiny layer of the same kind (kernel size, stride) for the smoke mode.

  Examples:
    >>> small = shrink(kernels.LAYERS[1])
    >>> small.name, small.hw, small.c_in, small.c_out, small.ksize
    ('stage1 3x3', 8, 4, 8, 3)
  """
  return dataclasses.replace(layer, hw=min(layer.hw, 8),
                             c_in=min(layer.c_in, 4),
                             c_out=min(layer.c_out, 8))


def _pick(names) -> tuple:
  found = [layer for key in names for layer in kernels.LAYERS
           if (layer.net, layer.name) == key]
  return tuple((shrink(layer), 2) for layer in found)


def interleave(layers: Sequence[kernels.Layer]) -> tuple:
  """``(layer, batch)`` pairs, the nets alternating (ResNet-20's first).

  A piece that runs out of time then has covered both nets.

  Examples:
    >>> [l.net[-2:] for l, _ in interleave(kernels.LAYERS)][:4]
    ['20', '50', '20', '50']
  """
  by_net: dict[str, list] = {}
  for layer in layers:
    by_net.setdefault(layer.net, []).append(layer)
  out = []
  for i in range(max(len(v) for v in by_net.values())):
    out += [(v[i], FULL_BATCHES[v[i].net]) for v in by_net.values()
            if i < len(v)]
  return tuple(out)


def settings_for(mode: str, platform: str) -> Settings:
  """The settings of ``mode`` (``'full'`` or ``'smoke'``) on ``platform``.

  Examples:
    >>> s = settings_for('smoke', 'cpu')
    >>> s.kernel_backend, s.train_batches, len(s.check_layers)
    ('pallas_gpu_interpret', (4,), 2)
    >>> len(settings_for('full', 'gpu').check_layers)
    14
  """
  if mode == 'smoke':
    return Settings(
        mode='smoke', kernel_backend='pallas_gpu_interpret',
        check_layers=_pick(SMOKE_CHECK), timing_layers=_pick(SMOKE_TIMING),
        repeats=2, warmup=1, min_time=0.0, group_seconds=1.0,
        unfold_max_bytes=2**26, train_config_arg='runlocal',
        train_batches=(4,), step_samples=2, mnist_steps=3, fast_compile=True)
  if mode != 'full':
    raise ValueError(f"mode must be 'full' or 'smoke', got {mode!r}.")
  del platform  # the 'pallas' backend is the platform's own kernels
  layers = interleave(kernels.LAYERS)
  return Settings(
      mode='full', kernel_backend='pallas', check_layers=layers,
      timing_layers=layers, repeats=7, warmup=2, min_time=0.01,
      group_seconds=2.0, unfold_max_bytes=2**32, train_config_arg=None,
      train_batches=(128, 256), step_samples=5, mnist_steps=40,
      fast_compile=False)


# ----------------------------------------------------------------------------
# Small helpers.


def one_line(error: BaseException, limit: int = 300) -> str:
  """``'Type: message'`` on one line, at most ``limit`` characters.

  Examples:
    >>> one_line(ValueError('bad\\n  value'))
    'ValueError: bad value'
  """
  text = ' '.join(str(error).split())
  text = f'{type(error).__name__}: {text}' if text else type(error).__name__
  return text if len(text) <= limit else text[:limit - 3] + '...'


def _clean(value: Any) -> Any:
  """JSON-safe: non-finite floats become ``None``, numpy scalars Python."""
  if isinstance(value, dict):
    return {str(k): _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  if isinstance(value, (np.floating, float)):
    value = float(value)
    return value if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, np.bool_):
    return bool(value)
  return value


def allocate_deadlines(now: float, end: float, group: Sequence[str],
                       remaining: Sequence[str]) -> list[float]:
  """Deadlines of a worker's pieces: their share of the time left.

  Each piece of ``remaining`` (the pieces still to run, ``group`` first) is
  owed ``WEIGHTS[piece] / sum(WEIGHTS of remaining)`` of ``end - now``; a
  worker's pieces get cumulative deadlines, so a piece that finishes early
  leaves its time to the next.

  Examples:
    >>> allocate_deadlines(0.0, 100.0, ['mnist'], ['mnist'])
    [100.0]
    >>> allocate_deadlines(0.0, 70.0, ['kernel_check'],
    ...                    ['kernel_check', 'kernel_timing'])
    [30.0]
  """
  total = sum(WEIGHTS[p] for p in remaining)
  out, acc = [], 0.0
  for piece in group:
    acc += WEIGHTS[piece]
    out.append(now + max(end - now, 0.0) * acc / total)
  return out


# ----------------------------------------------------------------------------
# The pieces (run in a worker process).


class Context:
  """A piece's view: settings, deadline, and where its rows go."""

  def __init__(self, piece: str, settings: Settings, deadline: float,
               recorder: 'Recorder'):
    self.piece = piece
    self.settings = settings
    self.deadline = deadline
    self.recorder = recorder

  def out_of_time(self, estimate: float = 0.0) -> bool:
    """Past the deadline, or a case of ``estimate`` seconds would be
    stopped (past the deadline by more than half the parent's grace)."""
    now = time.time()
    return now > self.deadline or now + estimate > self.deadline + GRACE / 2

  def plan(self, cases: Sequence[str]) -> None:
    """Announces the rows the piece will write (for a stopped worker)."""
    self.recorder.write(type='plan', piece=self.piece, cases=list(cases))

  def row(self, case: str, status: str, **fields) -> None:
    self.recorder.write(type='row', piece=self.piece, case=case,
                        status=status, **fields)
    print(f'[{self.recorder.elapsed():6.1f} s] {self.piece}: {case}: '
          f'{status}{_progress_detail(self.piece, fields)}', flush=True)


def _progress_detail(piece: str, f: dict) -> str:
  def num(key, fmt='{:.3g}'):
    v = f.get(key)
    return '-' if v is None or not math.isfinite(v) else fmt.format(v)
  if piece == 'kernel_check' and 'fwd_max_abs' in f:
    return (f" (max |err| fwd {num('fwd_max_abs', '{:.1e}')}, dX "
            f"{num('dx_max_abs', '{:.1e}')}, dW {num('dw_max_abs', '{:.1e}')}"
            f"; worst {num('worst_over_tol', '{:.2g}')} of tolerance)")
  if piece == 'kernel_timing' and 'pallas_f_ms' in f:
    return (f" (ms f / f+b: conv {num('conv_f_ms')} / {num('conv_fb_ms')}, "
            f"xla {num('xla_f_ms')} / {num('xla_fb_ms')}, pallas "
            f"{num('pallas_f_ms')} / {num('pallas_fb_ms')}, unfold "
            f"{num('unfold_f_ms')} / {num('unfold_fb_ms')})")
  if piece.startswith('train_step') and 'images_per_s' in f:
    return (f" ({num('step_ms')} ms/step, {num('images_per_s', '{:.0f}')} "
            f"img/s, peak {num('peak_mb', '{:.0f}')} MB)")
  if piece == 'mnist' and 'top1' in f:
    return (f" ({f.get('steps')} steps, {num('wall_s', '{:.1f}')} s, "
            f"test top-1 {num('top1', '{:.4f}')})")
  if f.get('error'):
    return f": {f['error']}"
  return ''


def case_name(layer: kernels.Layer) -> str:
  return f'{layer.net} {layer.name}'


def layer_fields(layer: kernels.Layer, batch: int) -> dict[str, Any]:
  m, k, t = layer.mkt(batch)
  return dict(net=layer.net, layer=layer.name, batch=batch,
              x_shape=list(layer.shapes(batch)[0]),
              k_shape=list(layer.shapes(batch)[1]), stride=layer.stride,
              m=m, k=k, t=t)


def layer_inputs(layer: kernels.Layer, batch: int, seed: int = 0):
  """``x`` (0.7 N(0, 1): many ``|x - w|`` inside and outside [-1, 1]), the
  kernel and an output cotangent, made on the device."""
  x_shape, k_shape = layer.shapes(batch)
  kx, kk, kg = jax.random.split(jax.random.key(seed), 3)
  x = 0.7 * jax.random.normal(kx, x_shape, jnp.float32)
  k = jax.random.normal(kk, k_shape, jnp.float32)
  y = jax.eval_shape(conv_op(layer.stride), x, k)
  gy = jax.random.normal(kg, y.shape, jnp.float32)
  return x, k, gy


def conv_op(stride: int) -> Callable:
  """``lax.conv_general_dilated`` (NHWC, HWIO, 'SAME'): the cuDNN baseline."""
  return lambda x, k: lax.conv_general_dilated(
      x, k, (stride, stride), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def adder_op(implementation: str, stride: int) -> Callable:
  """The public op with one backend, 'SAME' padding."""
  return lambda x, k: adderjax.ops.adder_conv(
      x, k, stride, 'SAME', implementation=implementation)


def unfold_op(layer: kernels.Layer) -> Callable:
  """The official unfold algorithm (symmetric padding: the same sizes and
  cost as 'SAME', the windows of a stride-2 layer shifted by one)."""
  pad = (layer.ksize - 1) // 2
  return lambda x, k: unfold.adder_unfold(x, k, layer.stride, pad)


def vjp_op(op: Callable) -> Callable:
  """``(x, k, gy) -> (y, dx, dk)``: the forward and both gradients."""
  def f(x, k, gy):
    y, pull = jax.vjp(op, x, k)
    dx, dk = pull(gy)
    return y, dx, dk
  return f


@jax.jit
def _errors(a, b, reduction):
  diff = jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))
  tol = RTOL * jnp.abs(b) + ATOL * reduction
  return jnp.max(diff), jnp.max(diff / tol)


def _compile(fn, args, fast: bool):
  traced = jax.jit(fn).trace(*args)
  return traced.lower().compile(_FAST_COMPILE if fast else None)


def check_layer(layer: kernels.Layer, batch: int,
                settings: Settings) -> dict[str, Any]:
  """Pallas vs XLA on one layer: forward, dX, dW (max error, over tolerance).

  Raises:
    Exception: whatever compiling or running a backend raises.
  """
  x, k, gy = layer_inputs(layer, batch)
  outs, compile_s = {}, {}
  for impl in (settings.kernel_backend, 'xla'):
    t0 = time.perf_counter()
    exe = _compile(vjp_op(adder_op(impl, layer.stride)), (x, k, gy),
                   settings.fast_compile)
    compile_s[impl] = time.perf_counter() - t0
    outs[impl] = jax.block_until_ready(exe(x, k, gy))
  m, kk, t = layer.mkt(batch)
  reductions = {'fwd': kk, 'dx': layer.ksize ** 2 * layer.c_out, 'dw': m}
  row: dict[str, Any] = {'compile_s': compile_s[settings.kernel_backend]}
  worst = 0.0
  for name, a, b in zip(('fwd', 'dx', 'dw'), outs[settings.kernel_backend],
                        outs['xla']):
    if a.shape != b.shape:
      raise ValueError(f'{name}: shape {a.shape} vs XLA {b.shape}')
    max_abs, over = (float(v) for v in _errors(a, b, reductions[name]))
    row[f'{name}_max_abs'] = max_abs
    row[f'{name}_over_tol'] = over
    row[f'{name}_reduction'] = reductions[name]
    worst = max(worst, over) if math.isfinite(over) else math.nan
  row['worst_over_tol'] = worst
  bad = [n for n in ('fwd', 'dx', 'dw') if not row[f'{n}_over_tol'] <= 1.0]
  row['status'] = ('ok' if not bad else
                   f'FAIL ({", ".join(bad)} beyond tolerance)')
  return row


def _layer_piece(ctx: Context, layers, measure) -> None:
  """Runs ``measure(layer, batch, settings)`` for each layer, one row each.

  A layer that would overrun the piece's time share is a skipped row; an
  exception is an error row (the next layer still runs).
  """
  ctx.plan([case_name(layer) for layer, _ in layers])
  last = 0.0
  for layer, batch in layers:
    fields = layer_fields(layer, batch)
    if ctx.out_of_time(last):
      ctx.row(case_name(layer), SKIPPED_BUDGET, **fields)
      continue
    t0 = time.perf_counter()
    try:
      result = measure(layer, batch, ctx.settings)
    except Exception as e:  # pylint: disable=broad-except
      result = {'status': 'error', 'error': one_line(e)}
    status = result.pop('status')
    last = time.perf_counter() - t0
    ctx.row(case_name(layer), status, **fields, **result, seconds=last)


def piece_kernel_check(ctx: Context) -> None:
  _layer_piece(ctx, ctx.settings.check_layers, check_layer)


def time_layer(layer: kernels.Layer, batch: int,
               settings: Settings) -> dict[str, Any]:
  """conv / xla / pallas (interleaved), then unfold: medians and ratios."""
  x, k, gy = layer_inputs(layer, batch)
  ops = {'conv': conv_op(layer.stride),
         'xla': adder_op('xla', layer.stride),
         'pallas': adder_op(settings.kernel_backend, layer.stride)}
  cands = []
  for name, op in ops.items():
    cands.append(common.Candidate(f'{name}_f', op, (x, k)))
    cands.append(common.Candidate(f'{name}_fb', vjp_op(op), (x, k, gy)))
  common.run_group(cands, repeats=settings.repeats, warmup=settings.warmup,
                   min_time=settings.min_time,
                   time_budget=settings.group_seconds)
  pad = (layer.ksize - 1) // 2
  unfold_bytes = unfold.broadcast_bytes(x.shape, k.shape, layer.stride, pad)
  row: dict[str, Any] = {'unfold_bytes': unfold_bytes}
  if unfold_bytes <= settings.unfold_max_bytes:
    ucands = [common.Candidate('unfold_f', unfold_op(layer), (x, k)),
              common.Candidate('unfold_fb', vjp_op(unfold_op(layer)),
                               (x, k, gy))]
    common.run_group(ucands, repeats=max(2, settings.repeats // 2),
                     warmup=1, min_time=settings.min_time,
                     time_budget=settings.group_seconds)
    cands += ucands
  else:
    row['unfold_note'] = (f'skipped: {unfold_bytes / 2**30:.1f} GiB '
                          'broadcast tensor')
  ms = {c.name: c.median_s * 1e3 for c in cands}
  for c in cands:
    row[f'{c.name}_ms'] = ms[c.name]
    row[f'{c.name}_compile_s'] = c.compile_s
  for part in ('f', 'fb'):
    p = ms.get(f'pallas_{part}', math.nan)
    row[f'pallas_vs_conv_{part}'] = p / ms.get(f'conv_{part}', math.nan)
    row[f'pallas_vs_xla_{part}'] = p / ms.get(f'xla_{part}', math.nan)
    row[f'xla_vs_conv_{part}'] = (ms.get(f'xla_{part}', math.nan) /
                                  ms.get(f'conv_{part}', math.nan))
    row[f'unfold_vs_pallas_{part}'] = ms.get(f'unfold_{part}', math.nan) / p
  model = kernels.roofline(layer, batch, kernels.H100)
  row.update(model_h100_conv_f_ms=model['conv_fwd'] / 1e3,
             model_h100_adder_f_ms=model['adder_fwd'] / 1e3,
             model_h100_conv_fb_ms=model['conv_fwd_bwd'] / 1e3,
             model_h100_adder_fb_ms=model['adder_fwd_bwd'] / 1e3)
  failed = {c.name: c.error for c in cands if c.error}
  if failed:
    row['errors'] = failed
  pallas_errors = [f'{n}: {e}' for n, e in failed.items()
                   if n.startswith('pallas')]
  row['status'] = ('error: ' + '; '.join(pallas_errors) if pallas_errors
                   else 'ok')
  return row


def piece_kernel_timing(ctx: Context) -> None:
  _layer_piece(ctx, ctx.settings.timing_layers, time_layer)


def _peak_bytes() -> float | None:
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats or 'peak_bytes_in_use' not in stats:
    return None
  return float(stats['peak_bytes_in_use'])


def time_train_step(kind: str, batch: int,
                    settings: Settings) -> dict[str, Any]:
  """The ResNet-20 train step of the experiments: img/s and peak memory."""
  config = resnet20_cifar10.get_config(settings.train_config_arg)
  config.model.kind = kind
  config.batch_size = batch
  exp = experiment.Experiment.from_config(config, data=False)
  t0 = time.perf_counter()
  compiled = exp.train_step.lower(exp.abstract_state(),
                                  exp.abstract_batch()).compile()
  compile_s = time.perf_counter() - t0
  state = exp.runner.put_state(exp.init_host_state())
  rng = np.random.default_rng(config.seed)
  data = exp.put_batch({
      'image': rng.integers(0, 256, (batch,) + exp.image_shape,
                            dtype=np.uint8),
      'label': rng.integers(0, exp.num_classes, (batch,), dtype=np.int32)})
  # The state is donated: each step consumes the previous one's output.
  t0 = time.perf_counter()
  state, metrics = compiled(state, data)
  jax.block_until_ready((state, metrics))
  first = time.perf_counter() - t0
  state, metrics = compiled(state, data)
  jax.block_until_ready((state, metrics))
  inner = max(1, min(20, int(0.1 / max(first, 1e-6))))
  times = []
  for _ in range(settings.step_samples):
    t0 = time.perf_counter()
    for _ in range(inner):
      state, metrics = compiled(state, data)
    jax.block_until_ready((state, metrics))
    times.append((time.perf_counter() - t0) / inner)
  step_s = float(np.median(times))
  loss = float(jax.device_get(metrics['loss']))
  compiled_bytes = common.memory_of(compiled)
  peak = _peak_bytes()
  row = dict(kind=kind, batch=batch, step_ms=step_s * 1e3,
             images_per_s=batch / step_s, compile_s=compile_s,
             compiled_mb=compiled_bytes / 2**20,
             peak_mb=(peak if peak is not None else compiled_bytes) / 2**20,
             peak_source=('memory_stats' if peak is not None else
                          'memory_analysis'),
             remat=steps.resolve_remat(config.remat, exp.runner.platform,
                                       (config.model.name, config.model.kind)),
             implementation=config.model.implementation,
             loss_sum=loss, steps_timed=settings.step_samples * inner)
  row['status'] = 'ok' if math.isfinite(loss) else 'FAIL (non-finite loss)'
  del state, data, compiled, exp
  gc.collect()
  return row


def piece_train_step(ctx: Context, kind: str) -> None:
  s = ctx.settings
  ctx.plan([f'{kind} b{b}' for b in s.train_batches])
  last = 0.0
  for batch in s.train_batches:
    name = f'{kind} b{batch}'
    if ctx.out_of_time(last):
      ctx.row(name, SKIPPED_BUDGET, kind=kind, batch=batch)
      continue
    t0 = time.perf_counter()
    try:
      result = time_train_step(kind, batch, s)
    except Exception as e:  # pylint: disable=broad-except
      result = {'status': 'error', 'error': one_line(e), 'kind': kind,
                'batch': batch}
    status = result.pop('status')
    last = time.perf_counter() - t0
    ctx.row(name, status, **result, seconds=last)


def find_mnist() -> str | None:
  """``data/mnist`` (of the working directory, else of the repository)."""
  for base in (os.getcwd(), _REPO):
    path = os.path.join(base, MNIST_DIR)
    if os.path.isdir(path) and any(n.startswith('train-images')
                                   for n in os.listdir(path)):
      return path
  return None


def piece_mnist(ctx: Context) -> None:
  s = ctx.settings
  case = 'lenet5_mnist adder'
  ctx.plan([case])
  with tempfile.TemporaryDirectory(prefix='device_check_mnist_') as tmp:
    config = lenet5_mnist.get_config()
    if s.mode == 'smoke':
      data_dir = testing.write_synthetic_mnist(os.path.join(tmp, 'mnist'),
                                               n_train=64, n_test=32)
      config.batch_size = 16
      config.eval_batch_size = 16
      source = 'synthetic'
    else:
      data_dir = find_mnist()
      if data_dir is None:
        ctx.row(case, f'skipped: no MNIST data in {MNIST_DIR} (python -m '
                'experiments.fetch_data mnist)')
        return
      source = data_dir
    config.dataset.data_dir = data_dir
    config.num_train_steps = s.mnist_steps
    config.progress_bar = False
    t0 = time.perf_counter()
    summary = train.train_and_evaluate(config, os.path.join(tmp, 'run'))
    wall = time.perf_counter() - t0
  ev = summary.get('eval') or {}
  top1, loss = ev.get('top1'), ev.get('loss')
  ok = (summary.get('finished') and top1 is not None and loss is not None
        and math.isfinite(loss))
  ctx.row(case, 'ok' if ok else 'FAIL (no finite evaluation)',
          data=source, verified=summary.get('dataset_verified'),
          batch=config.batch_size, steps=summary.get('steps'), wall_s=wall,
          images_per_s=summary.get('images_per_second'), top1=top1,
          loss=loss)


PIECE_FNS: dict[str, Callable[[Context], None]] = {
    'kernel_check': piece_kernel_check,
    'kernel_timing': piece_kernel_timing,
    'train_step_cnn': lambda ctx: piece_train_step(ctx, 'cnn'),
    'train_step_adder': lambda ctx: piece_train_step(ctx, 'adder'),
    'mnist': piece_mnist,
}


class Recorder:
  """Appends JSON records (one per line) to the worker's records file."""

  def __init__(self, path: str, t_start: float | None = None):
    self.path = path
    self.t_start = time.time() if t_start is None else t_start

  def elapsed(self) -> float:
    return time.time() - self.t_start

  def write(self, **record) -> None:
    with open(self.path, 'a') as f:
      f.write(json.dumps(_clean(record)) + '\n')
      f.flush()


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def environment(settings: Settings) -> dict[str, Any]:
  dev = jax.devices()[0]
  return dict(platform=jax.default_backend(), device_kind=dev.device_kind,
              device_count=jax.device_count(), jax=jax.__version__,
              jaxlib=_version('jaxlib'), python=sys.version.split()[0],
              mode=settings.mode, kernel_backend=settings.kernel_backend)


def run_worker(pieces: Sequence[str], deadlines: Sequence[float],
               records: str, smoke: bool, fail_piece: str | None,
               crash_piece: str | None, t_start: float) -> None:
  """Runs ``pieces`` in this process, each in try/except, writing records."""
  platform = jax.default_backend()
  mode = 'smoke' if smoke or platform not in ('gpu', 'tpu') else 'full'
  settings = settings_for(mode, platform)
  recorder = Recorder(records, t_start)
  recorder.write(type='env', **environment(settings))
  for piece, deadline in zip(pieces, deadlines):
    recorder.write(type='start', piece=piece)
    ctx = Context(piece, settings, deadline, recorder)
    t0 = time.time()
    if t0 > deadline:
      ctx.row('(piece)', SKIPPED_BUDGET)
    else:
      print(f'[{recorder.elapsed():6.1f} s] {piece}: start ({mode} mode, '
            f'{deadline - t0:.0f} s budget)', flush=True)
      try:
        if piece == crash_piece:
          print(f'{piece}: crashing the worker (--crash_piece)',
                file=sys.stderr, flush=True)
          os._exit(70)  # pylint: disable=protected-access
        if piece == fail_piece:
          raise RuntimeError(f'forced failure of piece {piece} '
                             '(--fail_piece)')
        PIECE_FNS[piece](ctx)
      except Exception as e:  # pylint: disable=broad-except
        ctx.row('(piece)', 'error', error=one_line(e))
    recorder.write(type='done', piece=piece, seconds=time.time() - t0)


# ----------------------------------------------------------------------------
# The parent: workers, budget, files.


def read_records(path: str) -> list[dict]:
  """The records a worker wrote (a torn last line is ignored)."""
  out = []
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except ValueError:
        pass
  return out


def _tail(path: str, lines: int = 1) -> str:
  try:
    with open(path, errors='replace') as f:
      text = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
  except OSError:
    return ''
  return ' / '.join(text[-lines:])


def absorb(pieces_out: dict, group: Sequence[str], records: list[dict],
           returncode: int | None, timed_out: bool, stderr_tail: str,
           seconds: float) -> dict | None:
  """Turns a worker's records (and how it ended) into the pieces' rows.

  A piece the worker finished keeps its rows. A piece it was running when it
  died (``error: ...``) or was stopped at its time limit (``skipped: time
  budget ...``) gets a ``(piece)`` row saying so; of the cases it had planned
  and not written, the first (the one running) is ``error: running when the
  worker died`` or ``stopped: time budget ...``, the others skipped. Pieces
  after it are ``skipped: time budget`` or ``skipped: the worker died in
  ...``.

  Returns:
    The worker's ``env`` record, if it wrote one.
  """
  env = next(({k: v for k, v in r.items() if k != 'type'} for r in records
              if r.get('type') == 'env'), None)
  crashed_in = None
  for piece in group:
    mine = [r for r in records if r.get('piece') == piece]
    rows = [{k: v for k, v in r.items() if k not in ('type', 'piece')}
            for r in mine if r.get('type') == 'row']
    started = any(r.get('type') == 'start' for r in mine)
    done = next((r for r in mine if r.get('type') == 'done'), None)
    entry = pieces_out[piece]
    entry['rows'] = rows
    entry['seconds'] = done.get('seconds') if done else None
    if done:
      continue
    if started:
      crashed_in = piece
      if timed_out:
        why = (f'{SKIPPED_BUDGET} (the worker was stopped after '
               f'{seconds:.0f} s)')
      else:
        why = (f'error: the worker process died (exit code {returncode})'
               + (f': {stderr_tail}' if stderr_tail else ''))
      rows.insert(0, {'case': '(piece)', 'status': why})
      seen = {r.get('case') for r in rows}
      plan = next((r.get('cases', []) for r in mine
                   if r.get('type') == 'plan'), [])
      missing = [c for c in plan if c not in seen]
      for i, c in enumerate(missing):
        if i == 0:  # the case that was running
          status = ('stopped: time budget (running when the worker was '
                    'stopped)' if timed_out else
                    'error: running when the worker died')
        else:
          status = SKIPPED_BUDGET if timed_out else 'skipped: not reached'
        rows.append({'case': c, 'status': status})
    elif timed_out:
      rows.append({'case': '(piece)', 'status': SKIPPED_BUDGET})
    else:
      why = (f'skipped: the worker died in {crashed_in}' if crashed_in else
             f'error: the worker process died before this piece (exit code '
             f'{returncode})' + (f': {stderr_tail}' if stderr_tail else ''))
      rows.append({'case': '(piece)', 'status': why})
  return env


def piece_status(rows: Sequence[dict]) -> str:
  """``ok``, ``failed``, ``skipped``, ``partial`` or ``not run``.

  ``failed``: a row is an error or a ``FAIL``; a case stopped at the time
  limit (``stopped: ...``) makes the piece ``partial``.

  Examples:
    >>> piece_status([{'status': 'ok'}, {'status': 'skipped: time budget'}])
    'partial'
    >>> piece_status([{'status': 'ok'}, {'status': 'error: boom'}])
    'failed'
  """
  statuses = [str(r.get('status', '')) for r in rows]
  if not statuses:
    return 'not run'
  if any(s.startswith(('error', 'FAIL')) for s in statuses):
    return 'failed'
  if all(s == 'ok' for s in statuses):
    return 'ok'
  if all(s.startswith('skipped') for s in statuses):
    return 'skipped'
  return 'partial'


def run_group(cmd: Sequence[str], group: Sequence[str], kill_at: float,
              records: str, log: str, pieces_out: dict,
              env_vars: dict | None = None) -> dict | None:
  """Runs one worker command until it ends or ``kill_at``; absorbs it.

  Args:
    cmd: the worker's command line.
    group: its pieces, in order.
    kill_at: ``time.time()`` past which the worker is killed.
    records: the records file it appends to.
    log: where its stderr goes.
    pieces_out: ``{piece: {...}}``, filled in by :func:`absorb`.
    env_vars: its environment (default: this process's).

  Returns:
    The worker's ``env`` record, if any.
  """
  t0 = time.time()
  with open(log, 'ab') as err:
    proc = subprocess.Popen(list(cmd), stderr=err, env=env_vars)
    timed_out = False
    try:
      proc.wait(timeout=max(kill_at - time.time(), 0.1))
    except subprocess.TimeoutExpired:
      timed_out = True
      proc.kill()
      proc.wait()
    except BaseException:
      proc.kill()
      proc.wait()
      raise
  return absorb(pieces_out, group, read_records(records),
                None if timed_out else proc.returncode, timed_out,
                _tail(log), time.time() - t0)


# ----------------------------------------------------------------------------
# The report.


def _f(value, fmt: str = '{:.3g}') -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return '-'
  return fmt.format(value)


def _ratio(value) -> str:
  if value is None or not math.isfinite(value):
    return '-'
  return f'{value:.1f}x' if value >= 10 else f'{value:.2f}x'


def _cell(text: Any) -> str:
  return ' '.join(str(text).split()).replace('|', '/')


def _shape(r: dict) -> str:
  if not r.get('x_shape'):
    return '-'
  n, h, w, c = r['x_shape']
  kh, _, _, t = r['k_shape']
  s = f"/{r['stride']}" if r.get('stride', 1) > 1 else ''
  return f'{n}x{h}x{w}x{c}->{t} {kh}x{kh}{s}'


def _summary_line(piece: str, rows: Sequence[dict]) -> str:
  counts: dict[str, int] = {}
  for r in rows:
    s = str(r.get('status', ''))
    key = (s if s == 'ok' or s.startswith('skipped') else
           s.split(':')[0].split(' (')[0])
    counts[key] = counts.get(key, 0) + 1
  text = ', '.join(f'{n} {k}' for k, n in counts.items())
  first_bad = next((r for r in rows if str(r.get('status', '')).startswith(
      ('error', 'FAIL', 'stopped'))), None)
  if first_bad is not None:
    detail = first_bad.get('error') or first_bad['status']
    text += f'; first: {first_bad.get("case")}: {detail}'
  del piece
  return _cell(text)[:300]


def render_markdown(report: dict) -> str:
  """``device_check.md``: header, summary table, one table per piece."""
  env = report.get('env') or {}
  pieces = report['pieces']
  lines = [
      '# Device check', '',
      f"- command: `{report['command']}`",
      f"- date: {report['date']}; wall: {_f(report.get('wall_s'), '{:.0f}')}"
      f" s of a {report['time_limit_s']:.0f} s limit",
      f"- device: {env.get('device_kind', '?')} x "
      f"{env.get('device_count', '?')} ({env.get('platform', '?')}); jax "
      f"{env.get('jax', '?')}, Python {env.get('python', '?')}",
      f"- mode: {env.get('mode', report.get('mode'))}; kernels checked: "
      f"`implementation='{env.get('kernel_backend', '?')}'` vs "
      "`implementation='xla'`", '', '## Summary', '']
  lines.append(common.table(
      ['piece', 'status', 'seconds', 'result'],
      [[p, pieces[p]['status'], _f(pieces[p].get('seconds'), '{:.1f}'),
        _summary_line(p, pieces[p]['rows'])] for p in PIECES]))

  rows = pieces['kernel_check']['rows']
  lines += ['', '## Kernel check: forward, dX, dW vs the XLA backend', '',
            f'Max |pallas - xla|; tolerance {RTOL:g} |xla| + {ATOL:g} R (R: '
            'the reduction size); `worst` is the largest error / tolerance '
            '(ok <= 1).', '']
  lines.append(common.table(
      ['layer', 'shape', 'M', 'K', 'T', 'fwd err', 'dX err', 'dW err',
       'worst', 'compile s', 'status'],
      [[r['case'], _shape(r), _f(r.get('m'), '{}'), _f(r.get('k'), '{}'),
        _f(r.get('t'), '{}'), _f(r.get('fwd_max_abs'), '{:.1e}'),
        _f(r.get('dx_max_abs'), '{:.1e}'), _f(r.get('dw_max_abs'), '{:.1e}'),
        _f(r.get('worst_over_tol'), '{:.2g}'),
        _f(r.get('compile_s'), '{:.1f}'),
        _cell(r['status'] + (f": {r['error']}" if r.get('error') and
                             r['status'] == 'error' else ''))]
       for r in rows]))

  rows = pieces['kernel_timing']['rows']
  lines += ['', '## Kernel timing: median ms per call (f: forward, f+b: '
            'forward + dX + dW)', '',
            'conv: `lax.conv_general_dilated` (cuDNN on a GPU); xla: the XLA '
            'adder backend; pallas: the kernels checked above; unfold: the '
            'official algorithm; model: the H100 roofline of '
            'docs/roofline.md for the adder kernels.', '']
  lines.append(common.table(
      ['layer', 'conv f', 'xla f', 'pallas f', 'unfold f', 'model f',
       'pallas/conv f', 'pallas/xla f', 'conv f+b', 'xla f+b', 'pallas f+b',
       'unfold f+b', 'model f+b', 'pallas/conv f+b', 'pallas/xla f+b',
       'unfold/pallas f+b', 'status'],
      [[r['case'], _f(r.get('conv_f_ms')), _f(r.get('xla_f_ms')),
        _f(r.get('pallas_f_ms')), _f(r.get('unfold_f_ms')),
        _f(r.get('model_h100_adder_f_ms')),
        _ratio(r.get('pallas_vs_conv_f')), _ratio(r.get('pallas_vs_xla_f')),
        _f(r.get('conv_fb_ms')), _f(r.get('xla_fb_ms')),
        _f(r.get('pallas_fb_ms')), _f(r.get('unfold_fb_ms')),
        _f(r.get('model_h100_adder_fb_ms')),
        _ratio(r.get('pallas_vs_conv_fb')), _ratio(r.get('pallas_vs_xla_fb')),
        _ratio(r.get('unfold_vs_pallas_fb')),
        _cell(r['status'] + (f": {r['error']}" if r.get('error') and
                             r['status'] == 'error' else ''))]
       for r in rows]))

  rows = (pieces['train_step_cnn']['rows'] +
          pieces['train_step_adder']['rows'])
  lines += ['', '## ResNet-20 train step (CIFAR-10, the experiments\' '
            'step; AddNN/CNN at the same batch)', '']
  lines.append(common.table(
      ['model', 'step ms', 'img/s', 'peak MB', 'peak from', 'compiled MB',
       'compile s', 'AddNN/CNN time', 'AddNN/CNN peak', 'status'],
      [[r['case'], _f(r.get('step_ms')), _f(r.get('images_per_s'), '{:.0f}'),
        _f(r.get('peak_mb'), '{:.0f}'), r.get('peak_source', '-'),
        _f(r.get('compiled_mb'), '{:.0f}'), _f(r.get('compile_s'), '{:.1f}'),
        _ratio(r.get('vs_cnn_time')), _ratio(r.get('vs_cnn_peak')),
        _cell(r['status'] + (f": {r['error']}" if r.get('error') and
                             r['status'] == 'error' else ''))]
       for r in rows]))

  rows = pieces['mnist']['rows']
  lines += ['', '## MNIST: a short run of the main job', '']
  lines.append(common.table(
      ['run', 'data', 'steps', 'wall s', 'img/s', 'test top-1', 'test loss',
       'status'],
      [[r['case'], _cell(r.get('data', '-')), _f(r.get('steps'), '{}'),
        _f(r.get('wall_s'), '{:.1f}'), _f(r.get('images_per_s'), '{:.0f}'),
        _f(r.get('top1'), '{:.4f}'), _f(r.get('loss'), '{:.4f}'),
        _cell(r['status'] + (f": {r['error']}" if r.get('error') and
                             r['status'] == 'error' else ''))]
       for r in rows]))
  return '\n'.join(lines) + '\n'


def _add_ratios(pieces: dict) -> None:
  """AddNN / CNN time and peak memory at each batch, on the adder rows."""
  cnn = {r.get('batch'): r for r in pieces['train_step_cnn']['rows']
         if r.get('status') == 'ok'}
  for r in pieces['train_step_adder']['rows']:
    base = cnn.get(r.get('batch'))
    if base is None or r.get('status') != 'ok':
      continue
    r['vs_cnn_time'] = r['step_ms'] / base['step_ms']
    if r.get('peak_mb') and base.get('peak_mb'):
      r['vs_cnn_peak'] = r['peak_mb'] / base['peak_mb']


def write_report(outdir: str, report: dict) -> None:
  for entry in report['pieces'].values():
    entry['status'] = piece_status(entry['rows'])
  _add_ratios(report['pieces'])
  for name, text in ((JSON_FILE, json.dumps(_clean(report), indent=1)),
                     (MD_FILE, render_markdown(report))):
    tmp = os.path.join(outdir, name + '.tmp')
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, os.path.join(outdir, name))


def run_parent(outdir: str, pieces: Sequence[str], smoke: bool,
               isolate: bool, time_limit: float, fail_piece: str | None,
               crash_piece: str | None, command: str) -> int:
  """Runs the pieces in worker processes and writes the report."""
  t_start = time.time()
  hard = t_start + time_limit
  end = hard - RESERVE
  logs = os.path.join(outdir, LOG_DIR)
  os.makedirs(logs, exist_ok=True)
  report = {
      'version': 1, 'command': command,
      'date': datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S'),
      'mode': 'smoke' if smoke else 'auto', 'time_limit_s': time_limit,
      'wall_s': None, 'env': None,
      'pieces': {p: {'status': 'not run', 'seconds': None, 'rows': [],
                     'selected': p in pieces} for p in PIECES}}
  for p in PIECES:
    if p not in pieces:
      report['pieces'][p]['rows'] = [{'case': '(piece)',
                                      'status': 'skipped: not selected'}]
  groups = [[p] for p in pieces] if isolate else [list(pieces)]
  child_env = dict(os.environ)
  child_env['PYTHONPATH'] = os.pathsep.join(
      [_REPO] + ([child_env['PYTHONPATH']] if child_env.get('PYTHONPATH')
                 else []))
  if smoke:
    # The CPU, and XLA without its expensive optimisations (the smoke mode
    # checks that everything runs; its times mean nothing).
    child_env['JAX_PLATFORMS'] = 'cpu'
    child_env['XLA_FLAGS'] = ' '.join(filter(None, [
        child_env.get('XLA_FLAGS'), SMOKE_XLA_FLAGS]))
  print(f'device check: {len(pieces)} piece(s) in {len(groups)} worker(s), '
        f'limit {time_limit:.0f} s; writing {outdir}', flush=True)
  for i, group in enumerate(groups):
    remaining = [p for g in groups[i:] for p in g]
    now = time.time()
    if end - now < MIN_START:
      for p in group:
        report['pieces'][p]['rows'] = [{'case': '(piece)',
                                        'status': SKIPPED_BUDGET}]
      print(f'{", ".join(group)}: {SKIPPED_BUDGET}', flush=True)
      continue
    deadlines = allocate_deadlines(now, end, group, remaining)
    kill_at = min(deadlines[-1] + GRACE, hard - 2.0)
    name = f'worker{i}_{group[0]}' if len(group) == 1 else f'worker{i}'
    records = os.path.join(logs, f'{i}_{name}.jsonl')
    log = os.path.join(logs, f'{i}_{name}.log')
    for path in (records, log):
      if os.path.exists(path):
        os.remove(path)
    cmd = [sys.executable, '-m', 'experiments.benchmarks.device_check',
           outdir, f'--worker={",".join(group)}',
           f'--deadlines={",".join(f"{d:.3f}" for d in deadlines)}',
           f'--records={records}', f'--t_start={t_start:.3f}']
    if smoke:
      cmd.append('--smoke')
    if fail_piece:
      cmd.append(f'--fail_piece={fail_piece}')
    if crash_piece:
      cmd.append(f'--crash_piece={crash_piece}')
    env = run_group(cmd, group, kill_at, records, log, report['pieces'],
                    child_env)
    if env and report['env'] is None:
      report['env'] = env
      report['mode'] = env.get('mode')
    for p in group:
      entry = report['pieces'][p]
      status = piece_status(entry['rows'])
      print(f'[{time.time() - t_start:6.1f} s] {p}: {status}'
            + ('' if status == 'ok' else
               f' ({_summary_line(p, entry["rows"])}; log {log})'),
            flush=True)
    report['wall_s'] = time.time() - t_start
    write_report(outdir, report)
  report['wall_s'] = time.time() - t_start
  write_report(outdir, report)
  print()
  print(common.table(
      ['piece', 'status', 'seconds'],
      [[p, report['pieces'][p]['status'],
        _f(report['pieces'][p].get('seconds'), '{:.1f}')] for p in PIECES]))
  print(f"\n{os.path.join(outdir, MD_FILE)}\n{os.path.join(outdir, JSON_FILE)}"
        f"\n({report['wall_s']:.0f} s)", flush=True)
  failed = any(report['pieces'][p]['status'] == 'failed' for p in PIECES)
  return 1 if failed else 0


# ----------------------------------------------------------------------------
# Command line.


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines this program's flags on ``flag_values``."""
  fv = flag_values
  flags.DEFINE_bool('smoke', False, 'The CPU smoke mode (tiny shapes, '
                    'interpret-mode kernels, workers pinned to the CPU); the '
                    'default without a GPU or TPU.', flag_values=fv)
  cli.define_list('pieces', list(PIECES), 'The pieces to run, of '
                  f'{", ".join(PIECES)}.', fv)
  flags.DEFINE_float('time_limit', TIME_LIMIT, 'Wall-clock limit of the '
                     'whole run, seconds (compilation included).',
                     lower_bound=1.0, flag_values=fv)
  flags.DEFINE_bool('isolate', None, 'One worker process per piece '
                    '(default: yes; with --smoke all pieces share one).',
                    flag_values=fv)
  flags.DEFINE_string('fail_piece', None, 'Testing: make this piece raise.',
                      flag_values=fv)
  flags.DEFINE_string('crash_piece', None, 'Testing: make the worker process '
                      'exit abruptly in this piece.', flag_values=fv)
  # Internal: how the parent starts a worker.
  flags.DEFINE_string('worker', None, 'Internal: run these pieces in this '
                      'process.', flag_values=fv)
  flags.DEFINE_string('deadlines', None, 'Internal: the worker pieces\' '
                      'deadlines (time.time()).', flag_values=fv)
  flags.DEFINE_string('records', None, 'Internal: the worker\'s records '
                      'file.', flag_values=fv)
  flags.DEFINE_float('t_start', None, 'Internal: the run\'s start '
                     '(time.time()).', flag_values=fv)


def _check_pieces(names: Sequence[str], flag: str) -> None:
  bad = [n for n in names if n not in PIECES]
  if bad:
    raise errors.UsageError(f'{flag} {bad}: choose from {", ".join(PIECES)}.')


def main(flag_values: flags.FlagValues, args: list[str]) -> int:
  """Runs the device check (or, with ``--worker``, one worker)."""
  fv = flag_values
  if len(args) != 1:
    raise errors.UsageError(f'expected one argument, OUTDIR; got {args} (see '
                            '--help).')
  outdir = os.path.abspath(args[0])
  for flag in ('fail_piece', 'crash_piece'):
    if fv[flag].value:
      _check_pieces([fv[flag].value], f'--{flag}')
  if fv.worker:
    pieces = fv.worker.split(',')
    _check_pieces(pieces, '--worker')
    deadlines = [float(d) for d in (fv.deadlines or '').split(',') if d]
    if len(deadlines) != len(pieces) or not fv.records:
      raise errors.UsageError('--worker needs --deadlines (one per piece) and '
                              '--records.')
    run_worker(pieces, deadlines, fv.records, fv.smoke, fv.fail_piece,
               fv.crash_piece, fv.t_start or time.time())
    return 0
  cli.check_workdir(outdir, 'OUTDIR')
  pieces = list(dict.fromkeys(fv.pieces or ()))
  _check_pieces(pieces, '--pieces')
  if not pieces:
    raise errors.UsageError(f'--pieces is empty: choose from '
                            f'{", ".join(PIECES)}.')
  pieces = [p for p in PIECES if p in pieces]
  os.makedirs(outdir, exist_ok=True)
  isolate = (not fv.smoke) if fv.isolate is None else fv.isolate
  command = cli.command_line('experiments.benchmarks.device_check', fv,
                             [args[0]])
  return run_parent(outdir, pieces, fv.smoke, isolate, fv.time_limit,
                    fv.fail_piece, fv.crash_piece, command)


if __name__ == '__main__':
  cli.run(main, define_flags)
