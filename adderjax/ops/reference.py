"""Pure-JAX (XLA) adder kernels: the ``'xla'`` backend and the reference.

This is the ``'xla'`` backend, available on every platform, and the fallback
of ``implementation=None``. It has two sets of functions.

**Patch-free kernels** (what :func:`adderjax.adder_conv` runs for
``implementation='xla'``): :func:`conv_forward`, :func:`conv_input_grad`,
:func:`conv_weight_grad` take the convolution's own arrays (feature-last
input, flax kernel, output cotangent) and never build a patch matrix. Each
kernel tap reads one contiguous slice of the flat shifted-phase layout of
:func:`adderjax.ops.geometry.flat_layout`; the vector axis is the feature
axis. Design (see ``docs/performance.md`` for the measurements behind it):

* Forward: the hot loop adds ``|x - w|`` for about 18 (tap, input feature)
  terms per fused XLA loop into an ``[N, L, G, T]`` accumulator.
* Input gradient: a gather over (tap, output feature) terms per input
  position, ``g * clip(w - x, -1, 1)`` (HardTanh) or ``g * sgn(w - x)``; the
  ``'unclipped'`` mode is two transposed convolutions on centred operands.
* Weight gradient: the convolution's own weight gradient (a matmul) of the
  input centred on a per-channel shift ``c``, plus ``(c - W) * sum g``;
  ``'sign'`` mode (an ablation) uses the patch path below.

Exactness: every kernel computes the paper's terms ``x - w`` directly, so its
error is a few ulps of the result whatever the magnitude of ``x`` and ``w``
(an identity such as ``-|x - w| = x + w - 2 max(x, w)`` cancels: at inputs
near 1e6 its error exceeds the result). The matmul identities are applied to
operands centred on a shift taken from the kernel, which keeps them exact for
inputs far from zero. A NaN (or an infinity) reaches exactly the outputs and
gradients whose terms read it; positions that no output reads get a zero
gradient.
* Large batches are processed in tiles whose working set fits the last-level
  cache (:data:`TILE_BYTES`).

**Patch-layout kernels** :func:`l1_forward`, :func:`l1_input_grad`,
:func:`l1_weight_grad` work on the canonical layout of
:mod:`adderjax.ops.geometry` (patches ``P[G, K, M]``, kernel ``W[G, K, T]``,
output / cotangent ``[G, T, M]``). They are the reference the accelerator
backends are tested against, and the weight gradient (a matmul) of every
backend.

Everything accumulates in float32 (float64 for float64 inputs); callers cast
back. HardTanh is written with selects ordered so that a NaN operand is
returned (:func:`clip_unit`): one vector instruction per bound on XLA:CPU
instead of four for ``jnp.clip``, with the same NaN propagation.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from adderjax.ops import geometry

_F32 = jnp.float32


def acc_dtype(*arrays) -> jnp.dtype:
  """Accumulation dtype: float32, or float64 when an input is float64."""
  return jnp.promote_types(jnp.result_type(*arrays), _F32)

#: Taps per fused chunk of the forward loop (trades compile time for speed).
FORWARD_UNROLL = 32
#: Output channels per fused chunk of the input-gradient loop.
INPUT_GRAD_UNROLL = 32
#: Taps per chunk of the sign-mode weight-gradient reduction.
SIGN_WEIGHT_GRAD_CHUNK = 8


def _pad_axis(a: jax.Array, axis: int, multiple: int) -> jax.Array:
  size = a.shape[axis]
  extra = (-size) % multiple
  if not extra:
    return a
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, extra)
  return jnp.pad(a, widths)


def _chunked_loop(n_items: int, unroll: int, body_chunk, init):
  """Runs ``body_chunk(start, size, carry)`` over ``ceil(n/unroll)`` chunks.

  Uses a ``fori_loop`` when there is more than one chunk so compile time stays
  bounded for long reductions; ``start`` is traced in that case.
  """
  n_chunks = -(-n_items // unroll)
  if n_chunks == 1:
    return body_chunk(0, init)
  return lax.fori_loop(0, n_chunks, lambda i, c: body_chunk(i * unroll, c),
                       init)


def l1_forward(p: jax.Array, w: jax.Array, *, unroll: int = FORWARD_UNROLL
               ) -> jax.Array:
  """``Y[g, t, m] = -sum_k |P[g, k, m] - W[g, k, t]|`` in float32.

  Args:
    p: patches ``[G, K, M]``.
    w: kernel ``[G, K, T]``.
    unroll: taps per fused chunk.

  Returns:
    ``[G, T, M]`` float32.
  """
  g, k, m = p.shape
  t = w.shape[2]
  dt = acc_dtype(p, w)
  if not k:
    return jnp.zeros((g, t, m), dt)
  u = min(unroll, k)
  pp = _pad_axis(p, 1, u)  # zero taps add |0 - 0| = 0
  wp = _pad_axis(w, 1, u)

  def chunk(start, acc):
    pc = lax.dynamic_slice_in_dim(pp, start, u, axis=1).astype(dt)
    wc = lax.dynamic_slice_in_dim(wp, start, u, axis=1).astype(dt)
    for j in range(u):
      acc = acc + jnp.abs(pc[:, j, None, :] - wc[:, j, :, None])
    return acc

  return jnp.zeros((), dt) - _chunked_loop(k, u, chunk,
                                          jnp.zeros((g, t, m), dt))


def _h(mode: str, d: jax.Array) -> jax.Array:
  if mode == 'full_precision':
    return clip_unit(d)
  if mode == 'sign':
    return jnp.sign(d)
  return d


def kernel_shift(w: jax.Array) -> jax.Array:
  """Per-row centre ``c[g, k]`` of a canonical kernel ``W[G, K, T]``.

  The mean of the row's entries (zero where it is not finite). The matmul
  identities ``sum_t g (w - p) = (W - c) g - (p - c) sum_t g`` hold for any
  ``c``; with ``c`` near the kernel's values (and so near the inputs that
  matter, those close to the kernel) neither product is large, so nothing
  cancels.
  """
  c = jnp.mean(w, axis=2)
  return jnp.where(jnp.isfinite(c), c, jnp.zeros((), c.dtype))


def l1_input_grad(p: jax.Array, w: jax.Array, gy: jax.Array, mode: str, *,
                  unroll: int = INPUT_GRAD_UNROLL,
                  precision=None) -> jax.Array:
  """``dP[g, k, m] = sum_t gy[g, t, m] * h(W[g, k, t] - P[g, k, m])``.

  ``h`` is HardTanh for ``'full_precision'`` (paper eq. 6-7), ``sign`` for
  ``'sign'`` (the exact subgradient) and the identity for ``'unclipped'``.

  Returns:
    ``[G, K, M]`` float32.
  """
  dt = acc_dtype(p, w, gy)
  gy = gy.astype(dt)
  if mode == 'unclipped':
    w, p = w.astype(dt), p.astype(dt)
    c = kernel_shift(w)[:, :, None]
    wg = jnp.einsum('gkt,gtm->gkm', w - c, gy, precision=precision,
                    preferred_element_type=dt)
    return wg - (p - c) * jnp.sum(gy, axis=1)[:, None, :]
  g, k, m = p.shape
  t = w.shape[2]
  u = min(unroll, t)
  wp = _pad_axis(w, 2, u)  # zero cotangent rows contribute nothing
  gp = _pad_axis(gy, 1, u)
  pa = p.astype(dt)

  def chunk(start, acc):
    wc = lax.dynamic_slice_in_dim(wp, start, u, axis=2).astype(dt)
    gc = lax.dynamic_slice_in_dim(gp, start, u, axis=1)
    for j in range(u):
      acc = acc + gc[:, j, None, :] * _h(mode, wc[:, :, j, None] - pa)
    return acc

  return _chunked_loop(t, u, chunk, jnp.zeros((g, k, m), dt))


def l1_weight_grad(p: jax.Array, w: jax.Array, gy: jax.Array, mode: str, *,
                   precision=None) -> jax.Array:
  """``dW[g, k, t] = sum_m gy[g, t, m] * h'(P[g, k, m] - W[g, k, t])``.

  ``h'`` is the identity for the full-precision modes (paper eq. 5), computed
  as a matmul on rows centred on :func:`kernel_shift` ``c`` plus a rank-1
  term, ``(P - c) gy^T + (c - W) sum_m gy``, and ``sign`` for ``'sign'``
  (eq. 3).

  Returns:
    ``[G, K, T]`` float32.
  """
  dt = acc_dtype(p, w, gy)
  gy = gy.astype(dt)
  if mode != 'sign':
    w, p = w.astype(dt), p.astype(dt)
    c = kernel_shift(w)[:, :, None]
    pg = jnp.einsum('gkm,gtm->gkt', p - c, gy, precision=precision,
                    preferred_element_type=dt)
    return pg + (c - w) * jnp.sum(gy, axis=2)[:, None, :]
  g, k, m = p.shape
  t = w.shape[2]
  u = min(SIGN_WEIGHT_GRAD_CHUNK, k)
  pp = _pad_axis(p, 1, u)
  wp = _pad_axis(w, 1, u)

  def chunk(start, acc):
    pc = lax.dynamic_slice_in_dim(pp, start, u, axis=1).astype(dt)
    wc = lax.dynamic_slice_in_dim(wp, start, u, axis=1).astype(dt)
    part = jnp.sum(gy[:, None, :, :] *
                   jnp.sign(pc[:, :, None, :] - wc[:, :, :, None]), axis=-1)
    return lax.dynamic_update_slice_in_dim(acc, part, start, axis=1)

  out = _chunked_loop(k, u, chunk, jnp.zeros(pp.shape[:2] + (t,), dt))
  return out[:, :k]


# --- Patch-free kernels on the feature-last input (the 'xla' backend) -------
#
# These take the convolution's own arrays (feature-last ``x``, flax kernel,
# output cotangent) and never build the patch matrix: each kernel tap is a
# contiguous slice of the flat shifted-phase layout of
# :func:`adderjax.ops.geometry.flat_layout`. The vector axis of the inner
# loops is the feature axis (output features in the forward pass, input
# features in the input gradient), which is the contiguous axis of NHWC, so
# no layout transpose is needed for stride 1.
#
# Two facts of XLA:CPU shape the code (measured with jax 0.10.2):
#
# * ``jnp.maximum`` / ``jnp.minimum`` propagate NaNs, which costs 4
#   instructions per element (max, unordered-compare, ternary-logic, masked
#   move); ``jnp.where(b > a, b, a)`` compiles to one ``vmaxps`` that returns
#   ``a`` when either is NaN, so with the bound as ``b`` a NaN ``a`` still
#   propagates (:func:`clip_unit`).
# * XLA does not reassociate float sums, so ``acc + t0 + t1 + ...`` is one
#   long dependency chain of 3-cycle adds; a pairwise tree of the chunk's terms
#   gives the out-of-order core independent work.

#: Taps x input features per fused chunk of :func:`conv_forward`.
CONV_FORWARD_TERMS = 18
#: Taps x output features per fused chunk of :func:`conv_input_grad`.
CONV_INPUT_GRAD_TERMS = 18


def clip_unit(d: jax.Array) -> jax.Array:
  """HardTanh ``clip(d, -1, 1)``; a NaN ``d`` gives NaN.

  Two selects that each compile to one ``vmaxps`` / ``vminps`` on XLA:CPU
  (``jnp.clip`` costs four instructions per bound for the same NaN
  semantics): a NaN fails both comparisons and falls through to ``d``.
  """
  one = jnp.ones((), d.dtype)
  lo = jnp.where(-one > d, -one, d)
  return jnp.where(one < lo, one, lo)


def _tree_sum(terms):
  terms = list(terms)
  while len(terms) > 1:
    pairs = [terms[i] + terms[i + 1] for i in range(0, len(terms) - 1, 2)]
    if len(terms) % 2:
      pairs.append(terms[-1])
    terms = pairs
  return terms[0]


#: Fewest terms per fused chunk: with fewer, LLVM unrolls the short feature
#: loop of the fusion and leaves it scalar (checked in the emitted assembly).
MIN_CHUNK_TERMS = 16


def _chunking(n: int, per_item: int, target: int) -> tuple[int, int]:
  """Items per chunk and the padded item count for ``target`` terms/chunk.

  A chunk holds at least :data:`MIN_CHUNK_TERMS` terms when there are that
  many. A divisor of ``n`` near the wanted size is preferred (no padding).
  """
  lo = -(-max(MIN_CHUNK_TERMS, 1) // per_item)
  want = max(lo, round(target / per_item))
  if want >= n:
    return n, n
  divisors = [d for d in range(lo, 2 * want + 1) if n % d == 0]
  if divisors:
    best = min(divisors, key=lambda d: (abs(d - want), d))
    return best, n
  return want, -(-n // want) * want


def _pad_to(a: jax.Array, axis: int, size: int) -> jax.Array:
  if a.shape[axis] == size:
    return a
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, size - a.shape[axis])
  return jnp.pad(a, widths)


def _conv_dimension_numbers(nsp: int) -> lax.ConvDimensionNumbers:
  spatial = tuple(range(1, nsp + 1))
  return lax.ConvDimensionNumbers(
      lhs_spec=(0, nsp + 1) + spatial,
      rhs_spec=(nsp + 1, nsp) + tuple(range(nsp)),
      out_spec=(0, nsp + 1) + spatial)


def _lax_conv(x, kernel, geo: geometry.ConvGeometry, precision, dtype):
  return lax.conv_general_dilated(
      x, kernel, geo.strides, geo.padding, rhs_dilation=geo.dilation,
      dimension_numbers=_conv_dimension_numbers(len(geo.kernel_size)),
      feature_group_count=geo.groups, precision=precision,
      preferred_element_type=dtype)


#: Bytes of activations a batch tile of the patch-free kernels works on. Each
#: chunk of the reduction streams the tile's accumulator and inputs once, so a
#: tile that fits in the last-level cache (32 MB here, shared) keeps those
#: passes out of DRAM.
TILE_BYTES = 8 * 2**20


def _forward_bytes_per_example(geo: geometry.ConvGeometry) -> int:
  fl = geometry.flat_layout(geo)
  read = len({ph for ph, _ in fl.taps})  # phases some tap reads
  return 4 * (read * fl.length_in * geo.in_features +
              2 * fl.length_out * geo.out_features)


def _input_grad_bytes_per_example(geo: geometry.ConvGeometry) -> int:
  fl = geometry.flat_layout(geo)
  rows = sum(fl.interior(p)[1] - fl.interior(p)[0]
             for p in range(len(fl.phases)) if fl.phase_taps(p))
  return 4 * (4 * rows * geo.in_features +
              (fl.length_in + fl.max_offset) * geo.out_features)


def _batch_tile(geo: geometry.ConvGeometry, per_example: int,
                tile_bytes: float) -> int:
  """Largest divisor of the batch whose working set fits ``tile_bytes``."""
  n = geo.batch
  want = max(1, int(tile_bytes // max(per_example, 1)))
  if want >= n:
    return n
  return max(d for d in range(1, want + 1) if n % d == 0)


def _map_batch_tiles(fn, geo: geometry.ConvGeometry, tile: int, *arrays):
  """``fn(geo_of_tile, *tiles)`` over batch tiles (one call if untiled)."""
  n = geo.batch
  if tile == n:
    return fn(geo, *arrays)
  geo_t = dataclasses.replace(geo, in_shape=(tile,) + geo.in_shape[1:])
  tiled = [a.reshape((n // tile, tile) + a.shape[1:]) for a in arrays]
  out = lax.map(lambda ts: fn(geo_t, *ts), tuple(tiled))
  return out.reshape((n,) + out.shape[2:])


def _negate_fenced(acc: jax.Array) -> jax.Array:
  """``-acc`` for ``acc >= 0`` (or NaN), ending in a ``select``.

  XLA:CPU grows a YNNPACK fusion from a reduction (a BatchNorm's mean, a
  loss) back through the elementwise ops that YNNPACK supports (add, abs,
  ...), and materialises every operand it stops at: a layer's whole
  unrolled l1 sum (one buffer per term) when the sum is not inside a loop
  (a one-chunk reduction, e.g. a 1x1 layer with 16 input features). A
  ``select`` is not taken into those fusions, so the layer ends in
  ``where(acc < 0, acc, 0 - acc)``, which is ``-acc`` for every value an
  l1 sum can hold (NaN included; ``0 - 0`` is ``+0``, as ``lax.conv`` gives
  for a zero result) and which XLA cannot fold without knowing the sign of
  ``acc``. The select reads nothing but ``acc``: an earlier fence,
  ``where(isnan(s), s, y)`` with ``s`` a separately computed part of ``y``,
  made XLA duplicate that part into consumer fusions and gave wrong
  gradients under ``jit`` (NaN in small networks).
  """
  return jnp.where(acc < 0, acc, jnp.zeros((), acc.dtype) - acc)


def _loop(n: int, body, init):
  """``fori_loop`` over ``n`` steps (a plain call when ``n == 1``).

  Peeling the first step off the loop (to save the zero-filled ``init``)
  doubles the unrolled code XLA compiles (ResNet-20's train step: 13.6 s
  instead of 10 s) for about 2 % of its run time, so it is not done.
  """
  if n == 1:
    return body(0, init)
  return lax.fori_loop(0, n, body, init)


def after_cotangent(x: jax.Array, gy: jax.Array) -> jax.Array:
  """``x`` (exactly), made to depend on the cotangent ``gy``.

  XLA:CPU's scheduler computes a value as soon as its operands exist, so a
  backward-pass copy of a layer input (padded layout, ``x - 1``, ``x + 1``,
  the transposes of the weight gradient) would be made during the forward
  pass and held until the backward pass reaches the layer: several
  activation-sized buffers per layer for the whole step. Adding a zero
  computed from ``gy`` at one position per example delays them until the
  cotangent exists; per example, so a batch-sharded step needs no
  communication for it. The zero is ``0 * b`` with ``b`` the cotangent
  bounded to ``[-1, 1]`` by two selects that also map NaN to a bound, so it
  is zero for every ``g`` (NaN and infinities included: a non-finite
  cotangent reaches only the gradients it should) and XLA cannot fold it
  (``where(|g| < 0, ...)`` is folded, and the copies move back into the
  forward pass: ResNet-20's train step held 1.5x the memory).
  """
  n = gy.shape[0]
  if not n or not gy.size:
    return x
  # A real (2-element) reduction, so that XLA computes the [N] vector on its
  # own instead of fusing a strided gather of gy into every consumer of x.
  first = jnp.max(gy.reshape(n, -1)[:, :2], axis=1).astype(x.dtype)
  one = jnp.ones((), x.dtype)
  bounded = jnp.where(first < one, first, one)  # NaN, +inf -> 1
  bounded = jnp.where(bounded > -one, bounded, -one)  # -inf -> -1
  zero = jnp.zeros((), x.dtype) * bounded
  return x + zero.reshape((n,) + (1,) * (x.ndim - 1))


def one_tap_input(x: jax.Array, geo: geometry.ConvGeometry
                  ) -> tuple[jax.Array, geometry.ConvGeometry]:
  """The input positions a one-tap kernel reads, and their unit geometry.

  A one-tap kernel (``1x1``, any stride and padding) reads one input position
  per output position: after padding and a strided slice, the layer is the
  same layer with unit strides and no padding on the sliced input (which is
  what the flat layout would otherwise build, with a copy of every phase).

  Args:
    x: feature-last input ``(N, *spatial, C_in)`` of a layer with
      ``geo.taps == 1``.
    geo: its geometry.

  Returns:
    ``(xs, geo_s)``: ``xs`` of shape ``(N, *out_spatial, C_in)`` and the
    geometry of the stride-1, unpadded layer on it.
  """
  if geo.taps != 1:
    raise ValueError(f'one_tap_input needs a one-tap kernel, got kernel size '
                     f'{geo.kernel_size}')
  nsp = len(geo.kernel_size)
  if any(geo.padding[i] != (0, 0) for i in range(nsp)):
    x = lax.pad(x, jnp.zeros((), x.dtype),
                [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in geo.padding] +
                [(0, 0, 0)])
  limit = tuple((o - 1) * s + 1 for o, s in zip(geo.out_spatial, geo.strides))
  if limit != x.shape[1:-1] or any(s != 1 for s in geo.strides):
    x = lax.slice(x, (0,) * x.ndim, (x.shape[0],) + limit + (x.shape[-1],),
                  (1,) + geo.strides + (1,))
  geo_s = dataclasses.replace(geo, in_shape=x.shape, strides=(1,) * nsp,
                              padding=((0, 0),) * nsp, dilation=(1,) * nsp)
  return x, geo_s


def _one_tap_reads_a_slice(geo: geometry.ConvGeometry) -> bool:
  """A one-tap kernel with strides or padding (see :func:`one_tap_input`)."""
  return geo.taps == 1 and (any(s != 1 for s in geo.strides) or
                            any(p != (0, 0) for p in geo.padding))


def channel_shift(kernel: jax.Array, geo: geometry.ConvGeometry
                  ) -> tuple[jax.Array, jax.Array]:
  """Per-input-channel centre of a flax kernel, for the matmul identities.

  ``c[ci]`` is the mean of the kernel entries that input channel ``ci``
  meets (its taps and its group's output features), zero where that mean is
  not finite. The identities ``sum g (x - w) = sum g (x - c) + (c - w) sum g``
  hold for any ``c``; with ``c`` near the kernel's values no product in them
  is much larger than the result, so they do not cancel when the inputs and
  the kernel sit far from zero.

  Returns:
    ``(c, ck)``: ``c`` of shape ``(C_in,)`` and ``ck`` of the kernel's shape,
    ``ck[..., j, t] = c[group(t) * C_in/G + j]``.
  """
  g = geo.groups
  cg, tg = geo.in_features // g, geo.out_features // g
  k = kernel.reshape(-1, cg, g, tg)
  c = jnp.mean(k, axis=(0, 3))  # [Cg, G]
  c = jnp.where(jnp.isfinite(c), c, jnp.zeros((), c.dtype))
  ck = jnp.broadcast_to(c[None, :, :, None], k.shape).reshape(kernel.shape)
  return c.T.reshape(g * cg), ck


def _tap_positions(geo: geometry.ConvGeometry) -> list[np.ndarray]:
  """Per spatial dim, ``[out_d, k_d]`` input coordinates read (static).

  Coordinates outside ``[0, size_d)`` are padding.
  """
  return [(np.arange(out) * s)[:, None] + (np.arange(k) * d)[None, :] - lo
          for k, s, d, (lo, _), out in zip(geo.kernel_size, geo.strides,
                                           geo.dilation, geo.padding,
                                           geo.out_spatial)]


def read_mask(geo: geometry.ConvGeometry):
  """Spatial mask of the input positions that some output reads, or None.

  ``None`` when every position is read (the usual case). Static (numpy).
  """
  per_dim = []
  for pos, size in zip(_tap_positions(geo), geo.in_shape[1:-1]):
    read = np.zeros(size, bool)
    read[pos[(pos >= 0) & (pos < size)]] = True
    per_dim.append(read)
  if all(r.all() for r in per_dim):
    return None
  mask = per_dim[0]
  for r in per_dim[1:]:
    mask = np.logical_and.outer(mask, r)
  return mask


def _pad_reads(geo: geometry.ConvGeometry):
  """``[prod(out_spatial), taps]`` indicator of taps reading padding, or None.

  Static (numpy); ``None`` when no tap of any output reads padding.
  """
  inside = [(pos >= 0) & (pos < size)  # [out_d, k_d]
            for pos, size in zip(_tap_positions(geo), geo.in_shape[1:-1])]
  if all(i.all() for i in inside):
    return None
  nsp = len(inside)
  both = np.ones((1,) * (2 * nsp), bool)
  for d, i in enumerate(inside):
    shape = [1] * (2 * nsp)
    shape[d], shape[nsp + d] = i.shape
    both = both & i.reshape(shape)
  return ~both.reshape(math.prod(geo.out_spatial), geo.taps)


def _zero_unread(dx: jax.Array, geo: geometry.ConvGeometry) -> jax.Array:
  """``dx`` with exact zeros at the input positions no output reads."""
  mask = read_mask(geo)
  if mask is None:
    return dx
  return jnp.where(mask[None, ..., None], dx, jnp.zeros((), dx.dtype))


def conv_forward(x: jax.Array, kernel: jax.Array,
                 geo: geometry.ConvGeometry, *,
                 terms: int = CONV_FORWARD_TERMS,
                 tile_bytes: float = TILE_BYTES) -> jax.Array:
  """Adder convolution forward pass without patches, in the accumulation dtype.

  ``-sum |x - w| = sum x + sum w - 2 sum max(x, w)``: the two plain sums are
  cheap (a channel sum and a box filter), and the hot loop adds
  ``max(x_slice, w)`` for ``terms`` (tap, input feature) pairs per fused
  XLA loop into an ``[N, L, G, T]`` accumulator whose last axis (the output
  features) is the vector axis.

  Args:
    x: feature-last input ``(N, *spatial, C_in)``.
    kernel: flax kernel ``(*kernel_size, C_in / G, C_out)``.
    geo: the convolution (see :func:`adderjax.ops.geometry.make_geometry`).
    terms: (tap, feature) pairs per fused loop chunk.
    tile_bytes: working set per batch tile (see :data:`TILE_BYTES`).

  Returns:
    ``(N, *out_spatial, C_out)`` in float32 (float64 for float64 inputs).
  """
  dt = acc_dtype(x, kernel)
  if _one_tap_reads_a_slice(geo):
    x, geo = one_tap_input(x, geo)
  tile = _batch_tile(geo, _forward_bytes_per_example(geo), tile_bytes)
  return _map_batch_tiles(
      lambda geo_t, xt: _forward_flat(xt, kernel, geo_t, dt, terms),
      geo, tile, x.astype(dt))


def _forward_flat(x, kernel, geo, dt, terms):
  """:func:`conv_forward` of one batch tile (``x`` already in ``dt``)."""
  fl = geometry.flat_layout(geo)
  g = geo.groups
  cg, tg = geo.in_features // g, geo.out_features // g
  n, length = geo.batch, fl.length_out
  nph, ntaps = len(fl.phases), len(fl.taps)
  xf = geometry.to_flat(x, fl)
  xf = xf.reshape(nph, n, fl.length_in, g, cg)
  w = kernel.astype(dt).reshape(ntaps, cg, g, tg)

  cu, cpad = _chunking(cg, ntaps, terms)
  xf = _pad_to(xf, 4, cpad)
  wp = _pad_to(w, 1, cpad)  # zero features add |0 - 0| = 0

  def chunk(i, acc):
    xc = lax.dynamic_slice_in_dim(xf, i * cu, cu, axis=4)
    wc = lax.dynamic_slice_in_dim(wp, i * cu, cu, axis=1)
    parts = [jnp.abs(xc[ph, :, off:off + length, :, j, None] - wc[ti, j])
             for ti, (ph, off) in enumerate(fl.taps) for j in range(cu)]
    return acc + _tree_sum(parts)

  acc = _loop(cpad // cu, chunk, jnp.zeros((n, length, g, tg), dt))
  return geometry.out_from_flat(_negate_fenced(acc).reshape(n, length, g * tg),
                                fl)


def conv_input_grad(x: jax.Array, kernel: jax.Array, gy: jax.Array,
                    geo: geometry.ConvGeometry, mode: str, *,
                    terms: int = CONV_INPUT_GRAD_TERMS,
                    precision=None,
                    tile_bytes: float = TILE_BYTES) -> jax.Array:
  """Input gradient ``dx = sum_{tap, t} gy * h(w - x)`` without patches.

  Gather form: each input position of each phase sums, over the taps that
  read that phase and the output features, the cotangent of the output
  position that read it times ``h(w - x)``; the vector axis is the input
  feature axis. ``h`` is HardTanh (``'full_precision'``), ``sign``
  (``'sign'``), or the identity (``'unclipped'``: two transposed
  convolutions on operands centred on a per-channel shift ``c``,
  ``conv^T(gy, w - c) - (x - c) * conv^T(gy, 1)``). Input positions that no
  output reads get exactly zero, whatever ``x`` holds there.

  Args:
    x: feature-last input ``(N, *spatial, C_in)``.
    kernel: flax kernel ``(*kernel_size, C_in / G, C_out)``.
    gy: output cotangent ``(N, *out_spatial, C_out)``.
    geo: the convolution.
    mode: ``'full_precision'``, ``'sign'`` or ``'unclipped'``.
    terms: (tap, output feature) pairs per fused loop chunk.
    precision: matmul precision of the ``'unclipped'`` transposed
      convolutions.
    tile_bytes: working set per batch tile (see :data:`TILE_BYTES`).

  Returns:
    ``(N, *spatial, C_in)`` in the accumulation dtype.
  """
  dt = acc_dtype(x, kernel, gy)
  x = after_cotangent(x.astype(dt), gy)
  if mode == 'unclipped':
    kd, gd = kernel.astype(dt), gy.astype(dt)
    c, ck = channel_shift(kd, geo)
    conv = lambda a, k: _lax_conv(a, k, geo, precision, dt)
    _, vjp_w = jax.vjp(lambda a: conv(a, kd - ck), x)
    _, vjp_1 = jax.vjp(lambda a: conv(a, jnp.ones_like(kd)), x)
    return _zero_unread(vjp_w(gd)[0] - (x - c) * vjp_1(gd)[0], geo)
  if _one_tap_reads_a_slice(geo):
    # A one-tap kernel reads only the strided slice of its input: the
    # gradient of the unit layer on that slice, scattered back by the
    # transpose of the slice (a pad with interior zeros), instead of a loop
    # per stride phase over phases that nothing reads.
    xs, slice_vjp = jax.vjp(lambda a: one_tap_input(a, geo)[0], x)
    _, geo_s = one_tap_input(x, geo)
    return slice_vjp(conv_input_grad(xs, kernel, gy, geo_s, mode,
                                     terms=terms, precision=precision,
                                     tile_bytes=tile_bytes))[0]
  tile = _batch_tile(geo, _input_grad_bytes_per_example(geo), tile_bytes)
  dx = _map_batch_tiles(
      lambda geo_t, xt, gt: _input_grad_flat(xt, kernel, gt, geo_t, mode, dt,
                                             terms),
      geo, tile, x, gy)
  return _zero_unread(dx, geo)


def _input_grad_flat(x, kernel, gy, geo, mode, dt, terms):
  """:func:`conv_input_grad` of one batch tile (``x`` already in ``dt``)."""
  fl = geometry.flat_layout(geo)
  g = geo.groups
  cg, tg = geo.in_features // g, geo.out_features // g
  n, length, lin = geo.batch, fl.length_out, fl.length_in
  nph, ntaps = len(fl.phases), len(fl.taps)
  mo = fl.max_offset
  xf = geometry.to_flat(x, fl)
  xf = xf.reshape(nph, n, lin, g, cg)
  w = kernel.astype(dt).reshape(ntaps, cg, g, tg).transpose(0, 3, 2, 1)
  gf = geometry.out_to_flat(gy.astype(dt), fl).reshape(n, length, g, tg)
  # gbig[:, mo + l] = gy at extended output position l, zero elsewhere, so
  # input position q of a tap with offset `off` reads gbig[:, q - off + mo].
  gbig = jnp.pad(gf, ((0, 0), (mo, lin - length), (0, 0), (0, 0)))

  outs = []
  for p in range(nph):
    ptaps = fl.phase_taps(p)
    # Only the grid rows that hold input positions: the padding rows' gradient
    # is cropped anyway (a quarter of the work for 8x8 inputs).
    q0, q1 = fl.interior(p)
    lq = q1 - q0
    if not ptaps or not lq:  # Nothing reads this phase (strided 1x1 kernel).
      outs.append(jnp.zeros((n, lin, g, cg), dt))
      continue
    tu, tpad = _chunking(tg, len(ptaps), terms)
    gp = _pad_to(gbig, 3, tpad)
    wp = _pad_to(w, 1, tpad)  # zero cotangents contribute nothing

    xp = xf[p, :, q0:q1]
    h = clip_unit if mode == 'full_precision' else jnp.sign

    def chunk(i, acc, ptaps=ptaps, tu=tu, gp=gp, wp=wp, xp=xp, q0=q0,
              lq=lq):
      gc = lax.dynamic_slice_in_dim(gp, i * tu, tu, axis=3)
      wc = lax.dynamic_slice_in_dim(wp, i * tu, tu, axis=1)
      parts = []
      for ti, off in ptaps:
        start = mo - off + q0
        for j in range(tu):
          gs = gc[:, start:start + lq, :, j, None]
          parts.append(gs * h(wc[ti, j] - xp))  # wc[ti, j]: [G, Cg]
      return acc + _tree_sum(parts)

    acc = _loop(tpad // tu, chunk, jnp.zeros((n, lq, g, cg), dt))
    outs.append(jnp.pad(acc, ((0, 0), (q0, lin - q1), (0, 0), (0, 0))))
  dxf = jnp.stack(outs).reshape(nph, n, lin, g * cg)
  return geometry.from_flat(dxf, fl)


def conv_weight_grad(x: jax.Array, kernel: jax.Array, gy: jax.Array,
                     geo: geometry.ConvGeometry, mode: str, *,
                     precision=None) -> jax.Array:
  """Kernel gradient in the flax kernel layout, in the accumulation dtype.

  Full-precision modes: ``dW = conv_weight_grad(x - c, gy) + (c - W) *
  sum gy`` (the convolution's own weight gradient, a matmul, plus a rank-1
  term; a plain ``einsum`` for one-tap kernels), with the input centred on
  :func:`channel_shift` ``c`` and padded explicitly first, so that padding
  enters as ``0 - c``. ``'sign'`` (an ablation) reduces ``gy * sgn(P - W)``
  over the patch matrix.
  """
  dt = acc_dtype(x, kernel, gy)
  if mode == 'sign':
    p = geometry.extract_patches(x, geo)
    w = geometry.kernel_to_canonical(kernel, geo)
    gyc = geometry.output_to_canonical(gy, geo)
    return geometry.kernel_from_canonical(
        l1_weight_grad(p, w, gyc, mode, precision=precision), geo)
  xd = after_cotangent(x.astype(dt), gy)
  kd, gd = kernel.astype(dt), gy.astype(dt)
  gsum = jnp.sum(gd, axis=tuple(range(gd.ndim - 1)))
  c, ck = channel_shift(kd, geo)
  rank1 = (ck - kd) * gsum
  if geo.taps == 1:
    # One tap (1x1 kernels, dense layers): a plain matmul of the (strided)
    # input with the cotangent, 3-5x faster here than XLA:CPU's lowering of
    # the convolution weight gradient (which transposes both operands).
    g = geo.groups
    cg, tg = geo.in_features // g, geo.out_features // g
    xs, _ = one_tap_input(xd, geo)
    xs = xs - c  # after padding: a padded zero enters as 0 - c
    if g == 1:  # No batch axis in the dot (its layout would cost copies).
      pg = jnp.einsum('mc,mt->ct', xs.reshape(-1, cg), gd.reshape(-1, tg),
                      precision=precision, preferred_element_type=dt)
    else:
      pg = jnp.einsum('mgc,mgt->cgt', xs.reshape(-1, g, cg),
                      gd.reshape(-1, g, tg), precision=precision,
                      preferred_element_type=dt)
    return pg.reshape(kd.shape) + rank1
  _, vjp = jax.vjp(lambda k: _lax_conv(xd - c, k, geo, precision, dt), kd)
  dw = vjp(gd)[0] + rank1
  pad_reads = _pad_reads(geo)
  if pad_reads is None:
    return dw
  # The convolution pads x - c with zeros, where the layer's padded zeros
  # give 0 - c: add -c times the cotangent summed over the output positions
  # at which each tap reads padding.
  gs = jnp.sum(gd, axis=0).reshape(-1, geo.out_features)  # [O, T]
  s_pad = jnp.einsum('ok,ot->kt', pad_reads.astype(dt), gs,
                     precision=lax.Precision.HIGHEST,
                     preferred_element_type=dt)  # [taps, T]
  g = geo.groups
  cg, tg = geo.in_features // g, geo.out_features // g
  s_pad = s_pad.reshape(-1, 1, g, tg)
  cm = c.reshape(g, cg).T[None, :, :, None]  # [1, Cg, G, 1]
  return dw - (cm * s_pad).reshape(kd.shape)
