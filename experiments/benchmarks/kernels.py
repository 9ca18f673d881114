"""Adder kernels vs a multiplication convolution: per layer and per train step.

``python -m experiments.benchmarks.kernels`` runs two parts (``--parts``):

**layers**: for every distinct conv layer of ResNet-20 (CIFAR-10, 32x32) and
ResNet-50 (ImageNet, 224x224), compare

* ``conv``: ``lax.conv_general_dilated`` (the multiplication baseline; tensor
  cores / MXU / oneDNN),
* ``xla``: ``adderjax.adder_conv(..., implementation='xla')``,
* ``pallas``: ``adderjax.adder_conv(..., implementation='pallas')`` (GPU/TPU
  only),

forward only and forward + backward (``jax.value_and_grad`` of a sum): the
median of ``--repeats`` timed calls of the compiled executable after a
warm-up call, and XLA's memory analysis of that executable (temp buffers,
argument and output bytes), with ratios vs conv.

**steps**: the experiments' own train step (:func:`experiments.aot.
train_step_spec`: model, optimizer and step of ``experiments/configs/
resnet20_cifar10.py`` / ``resnet50_imagenet.py``, placed and compiled by the
config's runner) for ``model.kind`` ``cnn`` and ``adder`` with
``model.implementation`` ``None`` (the default: Pallas on GPU/TPU) and
``'xla'``, on real inputs (the initial state, random ``uint8`` images): median
step time, images/s, XLA's temp memory and cost-analysis bytes accessed and
FLOPs per device, with ratios adder / cnn.

On CPU the Pallas columns are skipped (Pallas needs an accelerator; the
default implementation is XLA there); ``--quick`` is a CPU smoke run (ResNet-20
only, batch 1 layers, the ``runlocal`` model at batch 2 for the steps);
``--interpret`` adds a correctness-only interpret-mode run on one tiny shape.
Output: markdown tables on stdout; ``--json PATH`` saves every number. The
expected layer times are in ``docs/roofline.md``.

Examples:
  python -m experiments.benchmarks.kernels                  # on a device
  python -m experiments.benchmarks.kernels --parts steps --nets resnet50 \
      --step-batch-imagenet 64 --json steps.json
  python -m experiments.benchmarks.kernels --quick          # on CPU
  python -m experiments.benchmarks.kernels --roofline       # the model
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import statistics
import sys
import time
from collections.abc import Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import adderjax
from experiments import aot
from experiments import cli
from experiments import errors


@dataclasses.dataclass(frozen=True)
class Layer:
  """One conv layer: NHWC input, HWIO kernel."""
  net: str
  name: str
  hw: int           # input height = width
  c_in: int
  c_out: int
  ksize: int
  stride: int

  def shapes(self, batch: int):
    x = (batch, self.hw, self.hw, self.c_in)
    k = (self.ksize, self.ksize, self.c_in, self.c_out)
    return x, k

  def mkt(self, batch: int) -> tuple[int, int, int]:
    """(M, K, T) of the canonical patch layout ('SAME' padding)."""
    out = -(-self.hw // self.stride)
    return batch * out * out, self.ksize ** 2 * self.c_in, self.c_out


#: Distinct conv layers (each listed once; ResNet-20 has 3 stages of 3 basic
#: blocks, ResNet-50 4 stages of bottlenecks; the 7x7 stem is included).
LAYERS = (
    Layer('resnet20', 'stem 3x3', 32, 3, 16, 3, 1),
    Layer('resnet20', 'stage1 3x3', 32, 16, 16, 3, 1),
    Layer('resnet20', 'stage2 3x3/2', 32, 16, 32, 3, 2),
    Layer('resnet20', 'stage2 3x3', 16, 32, 32, 3, 1),
    Layer('resnet20', 'stage3 3x3/2', 16, 32, 64, 3, 2),
    Layer('resnet20', 'stage3 3x3', 8, 64, 64, 3, 1),
    Layer('resnet50', 'stem 7x7/2', 224, 3, 64, 7, 2),
    Layer('resnet50', 'conv2 1x1 in', 56, 256, 64, 1, 1),
    Layer('resnet50', 'conv2 3x3', 56, 64, 64, 3, 1),
    Layer('resnet50', 'conv2 1x1 out', 56, 64, 256, 1, 1),
    Layer('resnet50', 'conv3 3x3', 28, 128, 128, 3, 1),
    Layer('resnet50', 'conv4 3x3', 14, 256, 256, 3, 1),
    Layer('resnet50', 'conv4 1x1 out', 14, 256, 1024, 1, 1),
    Layer('resnet50', 'conv5 3x3', 7, 512, 512, 3, 1),
)


@dataclasses.dataclass(frozen=True)
class Hardware:
  """Peak rates of a roofline model (see docs/roofline.md).

  Attributes:
    name: label.
    vector_ops: f32 vector instructions per second (one op on one element).
    matrix_flops: matmul / conv FLOP/s on the matrix units (2 per MAC) for the
      dtype timed (TF32 on H100 for f32, bf16 single pass on the MXU).
    hbm: bytes per second.
    fwd_ops: vector ops per l1 term of the forward kernel.
    dx_ops: vector ops per term of the input-gradient kernel (HardTanh).
    fwd_tile_t: output channels per forward tile (P is re-read T / tile_t
      times).
    dx_tile_k: patch rows per input-gradient tile (gy re-read K / tile_k).
  """
  name: str
  vector_ops: float
  matrix_flops: float
  hbm: float
  fwd_ops: int
  dx_ops: int
  fwd_tile_t: int
  dx_tile_k: int


#: H100 SXM: 132 SMs x 128 FP32 lanes x 1.98 GHz = 33.5e12 instr/s (67 TFLOP/s
#: counting an FMA as 2); dense TF32 tensor cores 495 TFLOP/s; 3.35 TB/s.
#: Forward: FADD (w - p) + FADD (acc + |d|, abs is an operand modifier).
#: Input grad: FADD, FMNMX x2, FFMA.
H100 = Hardware('H100', 33.5e12, 495e12, 3.35e12, fwd_ops=2, dx_ops=4,
                fwd_tile_t=64, dx_tile_k=32)
#: TPU v5e: 1024-lane VPU at 1.5 GHz with 2 vector ALU slots assumed (the
#: TPUv2/v3 figure; v5e's count is not published): 3.1e12 ops/s; MXU 197
#: TFLOP/s bf16; 820 GB/s. Forward: max + add (LLO count of the kernel);
#: input grad: sub, max, min, mul, add.
V5E = Hardware('TPU v5e', 2 * 1024 * 1.5e9, 197e12, 0.82e12, fwd_ops=2,
               dx_ops=5, fwd_tile_t=32, dx_tile_k=32)


def roofline(layer: Layer, batch: int, hw: Hardware, itemsize: int = 4
             ) -> dict[str, float]:
  """Expected times (us) of one layer: adder kernels vs a conv, max(ops, bytes).

  Adder forward: ``M K T`` terms on the vector units; bytes: the patches
  (written once by im2col, read ``ceil(T / tile_t)`` times), the f32 output.
  Adder backward: the input-gradient kernel (patches once, ``gy`` re-read
  ``ceil(K / tile_k)`` times, ``dP`` written and read back by col2im) plus the
  weight gradient, a matmul of the conv's size on the matrix units. Conv:
  ``2 M K T`` FLOPs on the matrix units (forward; twice that backward), bytes:
  input and output once (implicit GEMM).
  """
  m, k, t = layer.mkt(batch)
  terms = m * k * t
  x_bytes = batch * layer.hw ** 2 * layer.c_in * itemsize
  y_bytes = m * t * 4
  p_bytes = m * k * itemsize
  us = 1e6

  def bound(ops, rate, nbytes):
    return max(ops / rate, nbytes / hw.hbm) * us

  fwd = bound(terms * hw.fwd_ops, hw.vector_ops,
              x_bytes + p_bytes * (1 + -(-t // hw.fwd_tile_t)) + y_bytes)
  dx = bound(terms * hw.dx_ops, hw.vector_ops,
             p_bytes + y_bytes * -(-k // hw.dx_tile_k) + 2 * m * k * 4 +
             x_bytes)
  dw = bound(2 * terms, hw.matrix_flops, p_bytes + y_bytes)
  conv = bound(2 * terms, hw.matrix_flops, x_bytes + y_bytes)
  conv_bwd = bound(4 * terms, hw.matrix_flops, 2 * (x_bytes + y_bytes))
  return dict(adder_fwd=fwd, adder_dx=dx, adder_dw=dw, conv_fwd=conv,
              conv_fwd_bwd=conv + conv_bwd, adder_fwd_bwd=fwd + dx + dw)


def print_roofline(nets, batches, out=None) -> None:
  """The expected-time table of docs/roofline.md."""
  out = out or sys.stdout
  for hw in (H100, V5E):
    print(f'\nroofline, {hw.name} (us): adder fwd | conv fwd | ratio || '
          'adder fwd+bwd (dx, dW) | conv fwd+bwd | ratio', file=out)
    for layer in LAYERS:
      if layer.net not in nets:
        continue
      r = roofline(layer, batches[layer.net], hw)
      print(f'  {layer.net + " " + layer.name:26s} {r["adder_fwd"]:9.1f} '
            f'{r["conv_fwd"]:8.1f} {r["adder_fwd"] / r["conv_fwd"]:6.1f}x || '
            f'{r["adder_fwd_bwd"]:9.1f} ({r["adder_dx"]:.1f}, '
            f'{r["adder_dw"]:.1f}) {r["conv_fwd_bwd"]:8.1f} '
            f'{r["adder_fwd_bwd"] / r["conv_fwd_bwd"]:6.1f}x', file=out)


def _conv(x, k, stride):
  return lax.conv_general_dilated(x, k, (stride, stride), 'SAME',
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _fn(kind: str, stride: int, backward: bool):
  if kind == 'conv':
    f = lambda x, k: _conv(x, k, stride)
  else:
    f = lambda x, k: adderjax.adder_conv(x, k, stride, 'SAME',
                                         implementation=kind)
  if backward:
    return jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(f(x, k)), (0, 1)))
  return jax.jit(f)


def median_time(fn, *args, repeats: int) -> float:
  """Median wall time (s) of ``fn(*args)`` after a compile + warm-up call."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


_MB = 1 / 2**20


def memory_mb(compiled) -> dict[str, float]:
  """XLA's memory analysis of a compiled executable, in MiB (per device).

  Returns:
    ``temp_mb`` (scratch buffers XLA allocates for the computation),
    ``argument_mb`` and ``output_mb`` (its inputs and results).

  Examples:
    >>> f = jax.jit(lambda x: x * 2).lower(jnp.zeros((256, 1024))).compile()
    >>> memory_mb(f)['argument_mb']
    1.0
  """
  mem = compiled.memory_analysis()
  return {'temp_mb': mem.temp_size_in_bytes * _MB,
          'argument_mb': mem.argument_size_in_bytes * _MB,
          'output_mb': mem.output_size_in_bytes * _MB}


def _ratio(a: float, b: float) -> str:
  """``a / b`` for a table cell; ``-`` when ``b`` is 0."""
  return f'{a / b:.2f}' if b > 0 else '-'


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
  return '\n'.join(lines)


def run(nets: Sequence[str], batches: dict[str, int], kinds: Sequence[str],
        repeats: int, dtype, backward: bool, out=None,
        names: Sequence[str] | None = None) -> list[dict]:
  """Times every layer of ``nets`` and reads XLA's memory analysis.

  Each (layer, kind) function is compiled once (``jit(f).lower().compile()``);
  the compiled executable is what is timed and what the memory figures
  describe.

  Args:
    nets: ``'resnet20'`` and/or ``'resnet50'``.
    batches: batch size per net.
    kinds: ``'conv'`` (required: the ratios' baseline), ``'xla'``,
      ``'pallas'``.
    repeats: timed calls per measurement (median).
    dtype: input dtype.
    backward: time ``value_and_grad`` of the sum instead of the forward.
    out: where to print the markdown table (default stdout).
    names: only the layers of :data:`LAYERS` with these names (default:
      all).

  Returns:
    One dict per layer: ``net, layer, batch, m, k, t`` and, per kind,
    ``{kind}_ms``, ``{kind}_temp_mb``, ``{kind}_argument_mb``,
    ``{kind}_output_mb``.

  Raises:
    ValueError: ``kinds`` lacks ``'conv'``.
  """
  out = out or sys.stdout
  if 'conv' not in kinds:
    raise ValueError(f"kinds {list(kinds)} must include 'conv' (the "
                     'baseline of the ratios).')
  rows = []
  rng = np.random.default_rng(0)
  others = [k for k in kinds if k != 'conv']
  header = (['layer', 'M', 'K', 'T'] + [f'{k} ms' for k in kinds] +
            [f'{k} temp MB' for k in kinds] + ['args+out MB'] +
            [f'{k}/conv' for k in others] +
            [f'{k}/conv temp' for k in others])
  cells = []
  for layer in LAYERS:
    if layer.net not in nets or (names and layer.name not in names):
      continue
    batch = batches[layer.net]
    x_shape, k_shape = layer.shapes(batch)
    x = jnp.asarray(rng.normal(size=x_shape), dtype)
    k = jnp.asarray(rng.normal(size=k_shape), dtype)
    m, kk, t = layer.mkt(batch)
    row = dict(net=layer.net, layer=layer.name, batch=batch, m=m, k=kk, t=t)
    for kind in kinds:
      compiled = _fn(kind, layer.stride, backward).lower(x, k).compile()
      row[f'{kind}_ms'] = 1e3 * median_time(compiled, x, k, repeats=repeats)
      for name, value in memory_mb(compiled).items():
        row[f'{kind}_{name}'] = value
    rows.append(row)
    cells.append(
        [f'{layer.net} {layer.name}', str(m), str(kk), str(t)] +
        [f'{row[f"{k}_ms"]:.3f}' for k in kinds] +
        [f'{row[f"{k}_temp_mb"]:.2f}' for k in kinds] +
        [f'{row["conv_argument_mb"] + row["conv_output_mb"]:.2f}'] +
        [_ratio(row[f'{k}_ms'], row['conv_ms']) for k in others] +
        [_ratio(row[f'{k}_temp_mb'], row['conv_temp_mb']) for k in others])
  print(f"\n### Layers, {'forward + backward' if backward else 'forward'} "
        f'({jnp.dtype(dtype).name}, median of {repeats}; temp = XLA compiled '
        'temp memory, args+out = argument + output bytes, the same for every '
        'kind)\n', file=out)
  print(_markdown(header, cells), file=out)
  return rows


# ----------------------------------------------------------------------------
# Whole train steps.

#: Nets of the train-step benchmark: their experiment config module and the
#: default batch per device.
STEP_CONFIGS = {
    'resnet20': ('experiments.configs.resnet20_cifar10', 128),
    'resnet50': ('experiments.configs.resnet50_imagenet', 32),
}


def step_variants(accel: bool) -> list[tuple[str, str | None]]:
  """``(model.kind, model.implementation)`` pairs timed per net.

  ``('adder', None)`` is the library's default (Pallas on GPU/TPU, XLA on
  CPU); on CPU it is the same program as ``('adder', 'xla')`` and is left out.

  Examples:
    >>> step_variants(accel=False)
    [('cnn', None), ('adder', 'xla')]
  """
  variants = [('cnn', None)]
  if accel:
    variants.append(('adder', None))
  variants.append(('adder', 'xla'))
  return variants


def _variant_name(kind: str, implementation: str | None) -> str:
  if kind != 'adder':
    return kind
  return f'adder ({implementation or "default"})'


def time_train_step(config, repeats: int, devices=None) -> dict[str, float]:
  """Compiles the config's train step as its runner does and times it.

  The step, runner and input shapes come from
  :func:`experiments.aot.train_step_spec`; the state is the model's real
  initial state (``Experiment.init_host_state`` placed by ``runner.put_state``),
  the batch random ``uint8`` images and labels placed by
  ``runner.put_batch``.

  Args:
    config: an experiments config (``batch_size`` is the global batch).
    repeats: timed steps (median), after a compile and two warm-up steps.
    devices: the devices (default: all).

  Returns:
    ``step_ms`` (median), ``images_per_s``, and :func:`experiments.aot.analyse`
    of the compiled step (``temp_mb``, ``argument_mb``, ``output_mb``,
    ``gflops``, ``bytes_accessed_gb``, ...; per device).
  """
  spec = aot.train_step_spec(config, devices)
  runner, exp = spec.runner, spec.experiment
  ds = config.dataset
  image_shape = exp.image_shape
  state = runner.put_state(exp.init_host_state())
  global_batch = config.batch_size
  local = global_batch // jax.process_count()
  rng = np.random.default_rng(config.seed)
  batch = runner.put_batch(
      {'image': rng.integers(0, 256, (local,) + image_shape, dtype=np.uint8),
       'label': rng.integers(0, ds.num_classes, (local,), dtype=np.int32)},
      global_batch)
  compiled = spec.step.lower(spec.state, spec.batch).compile()
  stats = aot.analyse(compiled)
  # The state is donated: each step consumes the previous one's output.
  for _ in range(2):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  return dict(step_ms=1e3 * step_s, images_per_s=global_batch / step_s,
              **stats)


def run_steps(nets: Sequence[str], batches: dict[str, int], repeats: int,
              accel: bool, config_arg: str | None = None,
              out=None) -> list[dict]:
  """Times the experiments' train step, cnn vs adder, per net.

  Args:
    nets: keys of :data:`STEP_CONFIGS`.
    batches: global batch per net.
    repeats: timed steps per variant (median).
    accel: whether the default backend is a GPU/TPU (adds the Pallas
      variant, ``model.implementation=None``).
    config_arg: the configs' argument (``'runlocal'``: the shrunken models
      of ``experiments/configs/default.py``, for a smoke run).
    out: where to print the markdown table (default stdout).

  Returns:
    One dict per (net, variant): ``net, kind, implementation, variant,
    config_arg, batch`` and the figures of :func:`time_train_step`.
  """
  out = out or sys.stdout
  rows = []
  for net in nets:
    module_name, _ = STEP_CONFIGS[net]
    for kind, implementation in step_variants(accel):
      config = importlib.import_module(module_name).get_config(config_arg)
      config.model.kind = kind
      config.model.implementation = implementation
      config.batch_size = batches[net]
      stats = time_train_step(config, repeats)
      rows.append(dict(net=net, kind=kind, implementation=implementation,
                       variant=_variant_name(kind, implementation),
                       config_arg=config_arg, batch=batches[net], **stats))
  header = ['net', 'model', 'batch', 'step ms', 'images/s', 'temp MB',
            'args MB', 'GB accessed', 'GFLOP', 'time/cnn', 'temp/cnn',
            'bytes/cnn']
  cells = []
  for row in rows:
    cnn = next(r for r in rows if r['net'] == row['net'] and
               r['kind'] == 'cnn')
    cells.append([
        row['net'], row['variant'], str(row['batch']),
        f'{row["step_ms"]:.2f}', f'{row["images_per_s"]:.1f}',
        f'{row["temp_mb"]:.1f}', f'{row["argument_mb"]:.1f}',
        f'{row["bytes_accessed_gb"]:.3f}', f'{row["gflops"]:.2f}',
        _ratio(row['step_ms'], cnn['step_ms']),
        _ratio(row['temp_mb'], cnn['temp_mb']),
        _ratio(row['bytes_accessed_gb'], cnn['bytes_accessed_gb'])])
  arch = f', config argument {config_arg!r}' if config_arg else ''
  print(f'\n### Train steps ({jax.device_count()} device(s){arch}, global '
        f'batch; median of {repeats} steps after 2 warm-up steps; memory and '
        'bytes per device from XLA\'s memory / cost analysis; ratios vs cnn)\n',
        file=out)
  print(_markdown(header, cells), file=out)
  return rows


def interpret_check(out=None) -> float:
  """Interpret-mode Pallas vs XLA on one tiny layer: max abs difference."""
  out = out or sys.stdout
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
  worst = 0.0
  for impl in ('pallas_gpu_interpret', 'pallas_tpu_interpret'):
    t0 = time.perf_counter()
    y = jax.jit(lambda x, k, impl=impl: adderjax.adder_conv(
        x, k, implementation=impl))(x, k)
    diff = float(jnp.max(jnp.abs(y - adderjax.adder_conv(
        x, k, implementation='xla'))))
    worst = max(worst, diff)
    print(f'{impl}: tiny layer (2x6x6x3 -> 4), max |pallas - xla| = '
          f'{diff:.2e} ({time.perf_counter() - t0:.1f} s incl. compile; '
          'interpret mode is for correctness, not speed)', file=out)
  return worst


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines this program's flags on ``flag_values`` (defaults per device)."""
  fv = flag_values
  accel = jax.default_backend() in ('gpu', 'tpu')
  n_dev = jax.device_count()
  flags.DEFINE_string('parts', 'layers,steps', 'Comma-separated: layers (per '
                      'conv layer), steps (per train step).', flag_values=fv)
  flags.DEFINE_bool('quick', False, 'ResNet-20 only, tiny batches, one '
                    "repeat, and for the steps the config's runlocal model "
                    '(3 blocks, width 8): a CPU smoke run; overrides the '
                    'batch and repeat flags.', flag_values=fv)
  flags.DEFINE_string('nets', 'resnet20,resnet50',
                      'Comma-separated: resnet20, resnet50.', flag_values=fv)
  flags.DEFINE_string('layers', None, 'Comma-separated layer names to time '
                      '(e.g. "stage1 3x3,conv5 3x3"; default: every layer).',
                      flag_values=fv)
  flags.DEFINE_integer('batch-cifar', 128 if accel else 8,
                       'ResNet-20 layer batch (default 128; 8 on CPU).',
                       flag_values=fv)
  flags.DEFINE_integer('batch-imagenet', 64 if accel else 1,
                       'ResNet-50 layer batch (default 64; 1 on CPU).',
                       flag_values=fv)
  flags.DEFINE_integer('step-batch-cifar', 128 * n_dev,
                       'ResNet-20 train step global batch (default 128 per '
                       'device).', flag_values=fv)
  flags.DEFINE_integer('step-batch-imagenet', 32 * n_dev,
                       'ResNet-50 train step global batch (default 32 per '
                       'device).', flag_values=fv)
  flags.DEFINE_integer('repeats', 20 if accel else 3,
                       'Timed calls per layer measurement (median).',
                       flag_values=fv)
  flags.DEFINE_integer('step-repeats', 10 if accel else 2,
                       'Timed train steps per variant (median).',
                       flag_values=fv)
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                    "Layer inputs dtype (steps use the config's).",
                    flag_values=fv)
  flags.DEFINE_bool('no-backward', False,
                    'Layers: time the forward pass only.', flag_values=fv)
  flags.DEFINE_string('json', None, 'Also write every measured number to '
                      'this path (JSON).', flag_values=fv)
  flags.DEFINE_bool('roofline', False, 'Print the roofline model of '
                    'docs/roofline.md (H100, TPU v5e) for the chosen batches '
                    'and exit.', flag_values=fv)
  flags.DEFINE_bool('interpret', False, 'Also run the Pallas kernels in '
                    'interpret mode on one tiny shape (a correctness check, '
                    'any platform).', flag_values=fv)


def _options(fv: flags.FlagValues):
  """``(options, nets, layer names, parts)``: the flags' values, checked.

  ``options`` holds every flag (``--quick`` applied), keyed by its name
  with ``_`` for ``-``.

  Raises:
    experiments.errors.UsageError: a value out of range.
  """
  n_dev = jax.device_count()
  opts = {name.replace('-', '_'): fv[name].value for name in (
      'parts', 'quick', 'nets', 'layers', 'batch-cifar', 'batch-imagenet',
      'step-batch-cifar', 'step-batch-imagenet', 'repeats', 'step-repeats',
      'dtype', 'no-backward', 'json', 'roofline', 'interpret')}
  nets = [n.strip() for n in opts['nets'].split(',') if n.strip()]
  unknown = set(nets) - {'resnet20', 'resnet50'}
  if unknown:
    raise errors.UsageError(f'unknown --nets {sorted(unknown)}; choose '
                            'resnet20, resnet50')
  if opts['quick']:
    nets = ['resnet20']
    opts.update(batch_cifar=1, repeats=1, step_repeats=1,
                step_batch_cifar=2 * n_dev)
  names = None
  if opts['layers']:
    names = [n.strip() for n in opts['layers'].split(',') if n.strip()]
    known = [layer.name for layer in LAYERS if layer.net in nets]
    bad = [n for n in names if n not in known]
    if bad:
      raise errors.UsageError(f'unknown --layers {bad} for {nets}; choose '
                              f'from {known}')
  parts = [p.strip() for p in opts['parts'].split(',') if p.strip()]
  if not parts or set(parts) - {'layers', 'steps'}:
    raise errors.UsageError(f'--parts {opts["parts"]!r}: choose layers '
                            'and/or steps')
  for flag in ('batch_cifar', 'batch_imagenet', 'repeats', 'step_repeats'):
    if opts[flag] < 1:
      raise errors.UsageError(f'--{flag.replace("_", "-")} must be >= 1, '
                              f'got {opts[flag]}')
  for flag in ('step_batch_cifar', 'step_batch_imagenet'):
    value = opts[flag]
    if value < 1 or value % n_dev:
      raise errors.UsageError(f'--{flag.replace("_", "-")} {value}: must be '
                              'a positive multiple of the device count '
                              f'{n_dev}')
  return opts, nets, names, parts


def main(flag_values: flags.FlagValues, args: list[str]) -> None:
  """Runs the parts asked for and prints their tables."""
  cli.no_arguments(args)
  platform = jax.default_backend()
  accel = platform in ('gpu', 'tpu')
  n_dev = jax.device_count()
  opts, nets, names, parts = _options(flag_values)
  batches = {'resnet20': opts['batch_cifar'],
             'resnet50': opts['batch_imagenet']}
  if opts['roofline']:
    print_roofline(nets, batches)
    return
  print(f'platform: {platform} ({jax.devices()[0].device_kind} x {n_dev}), '
        f'jax {jax.__version__}')
  kinds = ['conv', 'xla']
  if accel:
    kinds.append('pallas')
  else:
    print('Pallas needs a GPU or TPU: the Pallas columns are skipped on '
          f'{platform} (layers: conv vs xla; steps: cnn vs adder (xla), the '
          "library default implementation being XLA here); --interpret runs "
          'the kernels in interpret mode on a tiny shape.')
  results = dict(platform=platform, device_kind=jax.devices()[0].device_kind,
                 device_count=n_dev, jax_version=jax.__version__,
                 args=opts, layers_forward=[], layers_forward_backward=[],
                 steps=[])
  if 'layers' in parts:
    dtype = jnp.dtype(opts['dtype'])
    results['layers_forward'] = run(nets, batches, kinds, opts['repeats'],
                                    dtype, backward=False, names=names)
    if not opts['no_backward']:
      results['layers_forward_backward'] = run(
          nets, batches, kinds, opts['repeats'], dtype, backward=True,
          names=names)
  if 'steps' in parts:
    step_batches = {'resnet20': opts['step_batch_cifar'],
                    'resnet50': opts['step_batch_imagenet']}
    results['steps'] = run_steps(nets, step_batches, opts['step_repeats'],
                                 accel, 'runlocal' if opts['quick'] else None)
  if opts['interpret']:
    results['interpret_max_abs_diff'] = interpret_check()
  if opts['json']:
    with open(opts['json'], 'w') as f:
      json.dump(results, f, indent=1)
    print(f'\nraw numbers: {opts["json"]}')


if __name__ == '__main__':
  cli.run(main, define_flags)
