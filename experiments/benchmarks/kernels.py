"""Adder kernels vs a multiplication convolution on ResNet layer shapes.

``python -m experiments.benchmarks.kernels`` times, for every distinct conv
layer of ResNet-20 (CIFAR-10, 32x32) and ResNet-50 (ImageNet, 224x224):

* ``conv``: ``lax.conv_general_dilated`` (the multiplication baseline; tensor
  cores / MXU / oneDNN),
* ``xla``: ``adderjax.adder_conv(..., implementation='xla')``,
* ``pallas``: ``adderjax.adder_conv(..., implementation='pallas')`` (GPU/TPU
  only),

forward only and forward + backward (``jax.value_and_grad`` of a sum), as the
median of ``--repeats`` timed calls after a compile + warm-up call, all in one
process. On CPU the Pallas column is skipped (Pallas needs an accelerator);
``--interpret`` adds a correctness-only interpret-mode run on one tiny shape.
The expected times are in ``docs/roofline.md``.

Examples:
  python -m experiments.benchmarks.kernels                  # defaults
  python -m experiments.benchmarks.kernels --nets resnet20 --batch-cifar 32
  python -m experiments.benchmarks.kernels --interpret      # on CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import adderjax


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


def run(nets: Sequence[str], batches: dict[str, int], kinds: Sequence[str],
        repeats: int, dtype, backward: bool, out=None) -> list[dict]:
  """Times every layer of ``nets``; prints a table and returns its rows."""
  out = out or sys.stdout
  rows = []
  rng = np.random.default_rng(0)
  header = (f"{'layer':28s} {'M':>8s} {'K':>5s} {'T':>5s} " +
            ' '.join(f'{k + " ms":>11s}' for k in kinds) +
            ' ' + ' '.join(f'{k + "/conv":>12s}' for k in kinds
                           if k != 'conv'))
  print(f"{'forward + backward' if backward else 'forward'} "
        f'({jnp.dtype(dtype).name}, median of {repeats}):', file=out)
  print(header, file=out)
  for layer in LAYERS:
    if layer.net not in nets:
      continue
    batch = batches[layer.net]
    x_shape, k_shape = layer.shapes(batch)
    x = jnp.asarray(rng.normal(size=x_shape), dtype)
    k = jnp.asarray(rng.normal(size=k_shape), dtype)
    times = {kind: median_time(_fn(kind, layer.stride, backward), x, k,
                               repeats=repeats) for kind in kinds}
    m, kk, t = layer.mkt(batch)
    row = dict(net=layer.net, layer=layer.name, batch=batch, m=m, k=kk, t=t,
               **{f'{kind}_ms': 1e3 * v for kind, v in times.items()})
    rows.append(row)
    ratios = ' '.join(f'{times[kind] / times["conv"]:12.2f}'
                      for kind in kinds if kind != 'conv')
    print(f'{layer.net + " " + layer.name:28s} {m:8d} {kk:5d} {t:5d} ' +
          ' '.join(f'{1e3 * times[kind]:11.3f}' for kind in kinds) +
          ' ' + ratios, file=out)
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


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m experiments.benchmarks.kernels',
      description=__doc__.split('\n\n')[0])
  platform = jax.default_backend()
  accel = platform in ('gpu', 'tpu')
  parser.add_argument('--nets', default='resnet20,resnet50',
                      help='comma-separated: resnet20, resnet50')
  parser.add_argument('--batch-cifar', type=int, default=128 if accel else 8,
                      help='ResNet-20 batch (default 128; 8 on CPU)')
  parser.add_argument('--batch-imagenet', type=int, default=64 if accel else 1,
                      help='ResNet-50 batch (default 64; 1 on CPU)')
  parser.add_argument('--repeats', type=int, default=20 if accel else 3)
  parser.add_argument('--dtype', default='float32',
                      choices=('float32', 'bfloat16'))
  parser.add_argument('--no-backward', action='store_true',
                      help='time the forward pass only')
  parser.add_argument('--roofline', action='store_true',
                      help='print the roofline model of docs/roofline.md '
                      '(H100, TPU v5e) for the chosen batches and exit')
  parser.add_argument('--interpret', action='store_true',
                      help='also run the Pallas kernels in interpret mode on '
                      'one tiny shape (a correctness check, any platform)')
  args = parser.parse_args(argv)
  nets = [n.strip() for n in args.nets.split(',') if n.strip()]
  unknown = set(nets) - {'resnet20', 'resnet50'}
  if unknown:
    parser.error(f'unknown --nets {sorted(unknown)}; choose resnet20, '
                 'resnet50')
  batches = {'resnet20': args.batch_cifar, 'resnet50': args.batch_imagenet}
  if args.roofline:
    print_roofline(nets, batches)
    return 0
  print(f'platform: {platform} ({jax.devices()[0].device_kind}), '
        f'jax {jax.__version__}')
  kinds = ['conv', 'xla']
  if accel:
    kinds.append('pallas')
  else:
    print('Pallas needs a GPU or TPU: timing conv vs xla only '
          '(--interpret runs the kernels in interpret mode on a tiny shape).')
  dtype = jnp.dtype(args.dtype)
  run(nets, batches, kinds, args.repeats, dtype, backward=False)
  if not args.no_backward:
    run(nets, batches, kinds, args.repeats, dtype, backward=True)
  if args.interpret:
    interpret_check()
  return 0


if __name__ == '__main__':
  sys.exit(main())
