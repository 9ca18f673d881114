"""The XLA backend: ``implementation='xla'`` (CPU's default) and the base class.

:class:`XlaBackend` is the base implementation of every backend: each of its
methods does the XLA computation, and the accelerator backends
(:class:`adderjax.ops.pallas_backend.PallasBackend`, the platform switch
:class:`adderjax.ops.backends.DispatchBackend`) subclass it, override what
their kernels specialise, and fall back to ``super()`` for the rest.

Patch-free kernels on the convolution's own arrays (feature-last input, flax
kernel, output cotangent): :func:`conv_forward`, :func:`conv_input_grad`,
:func:`conv_weight_grad` never build a patch matrix. Each kernel tap reads one
contiguous slice of the flat shifted-phase layout of
:func:`adderjax.ops.geometry.to_flat` (whose sizes are properties of the
:class:`~adderjax.ops.geometry.ConvGeometry`); the vector axis is the feature
axis. Design (see ``docs/performance.md`` for the measurements behind it):

* Forward: the hot loop adds ``|x - w|`` for about 18 (tap, input feature)
  terms per fused XLA loop into an ``[N, L, G, T]`` accumulator.
* Input gradient: a gather over (tap, output feature) terms per input
  position, ``g * clip(w - x, -1, 1)`` (HardTanh) or ``g * sgn(w - x)``; the
  ``'unclipped'`` mode is two transposed convolutions on centred operands.
* Weight gradient: the convolution's own weight gradient (a matmul) of the
  input centred on a per-channel shift ``c``, plus ``(c - W) * sum g``;
  ``'sign'`` mode (an ablation) uses the patch path of
  :mod:`adderjax.ops.reference`.
* Large batches are processed in tiles whose working set fits the last-level
  cache (:attr:`XlaConfig.tile_bytes`).

The tuning constants are one frozen :class:`XlaConfig` (:data:`CONFIG`),
measured on XLA:CPU; the weight gradient and the ``'unclipped'`` input
gradient are convolutions, so the accelerator backends reuse them (with
``tile_bytes=None``: no batch tiles).

Exactness: every kernel computes the paper's terms ``x - w`` directly, so its
error is a few ulps of the result whatever the magnitude of ``x`` and ``w``
(an identity such as ``-|x - w| = x + w - 2 max(x, w)`` cancels: at inputs
near 1e6 its error exceeds the result). The matmul identities are applied to
operands centred on a shift taken from the kernel, which keeps them exact for
inputs far from zero. A NaN (or an infinity) reaches exactly the outputs and
gradients whose terms read it; positions that no output reads get a zero
gradient.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from adderjax.ops import geometry
from adderjax.ops import protocol
from adderjax.ops.reference import acc_dtype
from adderjax.ops.reference import clip_unit
from adderjax.ops.reference import l1_weight_grad

# --- Patch-free kernels on the feature-last input (the 'xla' backend) -------
#
# These take the convolution's own arrays (feature-last ``x``, flax kernel,
# output cotangent) and never build the patch matrix: each kernel tap is a
# contiguous slice of the flat shifted-phase layout of
# :func:`adderjax.ops.geometry.to_flat`. The vector axis of the inner
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

@dataclasses.dataclass(frozen=True)
class XlaConfig:
  """Tuning of the XLA backend (measured on XLA:CPU, jax 0.10.2).

  Attributes:
    forward_terms: (tap, input feature) pairs per fused chunk of
      :func:`conv_forward`.
    input_grad_terms: (tap, output feature) pairs per fused chunk of
      :func:`conv_input_grad`.
    tile_bytes: bytes of activations a batch tile works on, or ``None`` for
      no tiles. Each chunk of the reduction streams the tile's accumulator
      and inputs once, so a tile that fits in the last-level cache (32 MB
      on the machines measured, shared) keeps those passes out of DRAM.

  Examples:
    >>> from adderjax.ops.xla_backend import XlaConfig
    >>> XlaConfig(tile_bytes=None).forward_terms
    18
    >>> XlaConfig(forward_terms=0)
    Traceback (most recent call last):
    ...
    ValueError: XlaConfig.forward_terms must be a positive int, got 0.
  """
  forward_terms: int = 18
  input_grad_terms: int = 18
  tile_bytes: float | None = 8 * 2**20

  def __post_init__(self):
    for name in ('forward_terms', 'input_grad_terms'):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f'XlaConfig.{name} must be a positive int, got '
                         f'{value!r}.')
    t = self.tile_bytes
    if t is not None and (isinstance(t, bool) or
                          not isinstance(t, (int, float)) or not t > 0):
      raise ValueError(f'XlaConfig.tile_bytes must be None or a positive '
                       f'number of bytes, got {t!r}.')


#: The configuration :func:`conv_forward` and :func:`conv_input_grad` use.
CONFIG = XlaConfig()
CONV_FORWARD_TERMS = CONFIG.forward_terms
CONV_INPUT_GRAD_TERMS = CONFIG.input_grad_terms


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


#: Bytes of activations per batch tile (see :class:`XlaConfig`).
TILE_BYTES = CONFIG.tile_bytes


def _forward_bytes_per_example(geo: geometry.ConvGeometry) -> int:
  read = len({ph for ph, _ in geo.tap_offsets})  # phases some tap reads
  return 4 * (read * geo.flat_length_in * geo.in_features +
              2 * geo.flat_length_out * geo.out_features)


def _input_grad_bytes_per_example(geo: geometry.ConvGeometry) -> int:
  rows = sum(geo.phase_interior(p)[1] - geo.phase_interior(p)[0]
             for p in range(len(geo.phases)) if geo.phase_taps(p))
  return 4 * (4 * rows * geo.in_features +
              (geo.flat_length_in + geo.max_offset) * geo.out_features)


def _batch_tile(geo: geometry.ConvGeometry, per_example: int,
                tile_bytes: float) -> int:
  """Largest divisor of the batch whose working set fits ``tile_bytes``.

  A symbolic batch or spatial size (``jax.export``) is one tile: the tiles
  are divisors of the batch, which is not known when exporting.
  """
  n = geo.batch
  if tile_bytes is None or geo.symbolic:
    return n
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


def _dim_tap_positions(geo: geometry.ConvGeometry, dim: int) -> np.ndarray:
  """``[out_d, k_d]`` input coordinates read in spatial ``dim`` (static)."""
  k, s, d = geo.kernel_size[dim], geo.strides[dim], geo.dilation[dim]
  lo, out = geo.padding[dim][0], geo.out_spatial[dim]
  return (np.arange(out) * s)[:, None] + (np.arange(k) * d)[None, :] - lo


def _every_position_read(geo: geometry.ConvGeometry) -> bool:
  """Whether every input position is read by some output (static).

  Decided per spatial dim so that a symbolic size (``jax.export``) is
  allowed: :func:`~adderjax.ops.geometry.
  make_geometry` takes one only with unit stride and dilation, where the
  taps' windows ``[i - lo, i - lo + out)`` cover ``[0, size)``.
  """
  for dim, size in enumerate(geo.in_shape[1:-1]):
    if geometry.is_symbolic(size):
      continue
    pos = _dim_tap_positions(geo, dim)
    read = np.zeros(size, bool)
    read[pos[(pos >= 0) & (pos < size)]] = True
    if not read.all():
      return False
  return True


def _no_tap_reads_padding(geo: geometry.ConvGeometry) -> bool:
  """Whether no tap of any output reads padding (static).

  Decided per spatial dim (a symbolic size, with unit stride and dilation,
  reads padding exactly where it has padding).
  """
  for dim, size in enumerate(geo.in_shape[1:-1]):
    if geometry.is_symbolic(size):
      if geo.padding[dim] != (0, 0):
        return False
      continue
    pos = _dim_tap_positions(geo, dim)
    if not ((pos >= 0) & (pos < size)).all():
      return False
  return True


# The masks below are built inside the computation (iota and compares) from
# static shapes, not closed over as numpy arrays: jax >= 0.12 passes
# closed-over constants over 1 KiB to the executable as arguments
# (``jax_use_simplified_jaxpr_constants``), which would add to the op's
# argument bytes. Same values, so the same results.


def _traced_tap_positions(geo: geometry.ConvGeometry) -> list[jax.Array]:
  """Per spatial dim, the ``[out_d, k_d]`` input coordinates the taps read
  (int32, built in the computation; outside ``[0, size_d)`` is padding)."""
  return [lax.broadcasted_iota(jnp.int32, (out, k), 0) * s
          + lax.broadcasted_iota(jnp.int32, (out, k), 1) * d - lo
          for k, s, d, (lo, _), out in zip(geo.kernel_size, geo.strides,
                                           geo.dilation, geo.padding,
                                           geo.out_spatial)]


def _traced_pad_reads(geo: geometry.ConvGeometry) -> jax.Array:
  """``[prod(out_spatial), taps]``: True where a tap reads padding (bool,
  built in the computation)."""
  inside = [(pos >= 0) & (pos < size)  # [out_d, k_d]
            for pos, size in zip(_traced_tap_positions(geo),
                                 geo.in_shape[1:-1])]
  nsp = len(inside)
  both = jnp.ones((1,) * (2 * nsp), bool)
  for d, i in enumerate(inside):
    shape = [1] * (2 * nsp)
    shape[d], shape[nsp + d] = i.shape
    both = both & i.reshape(shape)
  return ~both.reshape(math.prod(geo.out_spatial), geo.taps)


def _zero_unread(dx: jax.Array, geo: geometry.ConvGeometry) -> jax.Array:
  """``dx`` with exact zeros at the input positions no output reads."""
  if _every_position_read(geo):  # Static: every position is read.
    return dx
  mask = None
  for pos, size in zip(_traced_tap_positions(geo), geo.in_shape[1:-1]):
    coord = lax.broadcasted_iota(jnp.int32, (size, 1, 1), 0)
    read = jnp.any(pos[None] == coord, axis=(1, 2))  # [size]
    mask = read if mask is None else mask[..., None] & read
  return jnp.where(mask[None, ..., None], dx, jnp.zeros((), dx.dtype))


def conv_forward(x: jax.Array, kernel: jax.Array,
                 geo: geometry.ConvGeometry, *,
                 terms: int = CONV_FORWARD_TERMS,
                 tile_bytes: float | None = TILE_BYTES) -> jax.Array:
  """Adder convolution forward pass without patches, in the accumulation dtype.

  The hot loop adds ``|x_slice - w|`` for ``terms`` (tap, input feature)
  pairs per fused XLA loop into an ``[N, L, G, T]`` accumulator whose last
  axis (the output features) is the vector axis, and the result ends in a
  select that negates it (``_negate_fenced``).

  Args:
    x: feature-last input ``(N, *spatial, C_in)``.
    kernel: flax kernel ``(*kernel_size, C_in / G, C_out)``.
    geo: the convolution (see :func:`adderjax.ops.geometry.make_geometry`).
    terms: (tap, feature) pairs per fused loop chunk.
    tile_bytes: working set per batch tile (see :class:`XlaConfig`), or
      ``None`` for one tile.

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
  g = geo.groups
  cg, tg = geo.in_features // g, geo.out_features // g
  n, length = geo.batch, geo.flat_length_out
  nph, ntaps = len(geo.phases), len(geo.tap_offsets)
  xf = geometry.to_flat(x, geo)
  xf = xf.reshape(nph, n, geo.flat_length_in, g, cg)
  w = kernel.astype(dt).reshape(ntaps, cg, g, tg)

  cu, cpad = _chunking(cg, ntaps, terms)
  xf = _pad_to(xf, 4, cpad)
  wp = _pad_to(w, 1, cpad)  # zero features add |0 - 0| = 0

  def chunk(i, acc):
    xc = lax.dynamic_slice_in_dim(xf, i * cu, cu, axis=4)
    wc = lax.dynamic_slice_in_dim(wp, i * cu, cu, axis=1)
    parts = [jnp.abs(xc[ph, :, off:off + length, :, j, None] - wc[ti, j])
             for ti, (ph, off) in enumerate(geo.tap_offsets)
             for j in range(cu)]
    return acc + _tree_sum(parts)

  acc = _loop(cpad // cu, chunk, jnp.zeros((n, length, g, tg), dt))
  return geometry.out_from_flat(_negate_fenced(acc).reshape(n, length, g * tg),
                                geo)


def conv_input_grad(x: jax.Array, kernel: jax.Array, gy: jax.Array,
                    geo: geometry.ConvGeometry, mode: str, *,
                    terms: int = CONV_INPUT_GRAD_TERMS,
                    precision=None,
                    tile_bytes: float | None = TILE_BYTES) -> jax.Array:
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
    tile_bytes: working set per batch tile (see :class:`XlaConfig`), or
      ``None`` for one tile.

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
  g = geo.groups
  cg, tg = geo.in_features // g, geo.out_features // g
  n, length, lin = geo.batch, geo.flat_length_out, geo.flat_length_in
  nph, ntaps = len(geo.phases), len(geo.tap_offsets)
  mo = geo.max_offset
  xf = geometry.to_flat(x, geo)
  xf = xf.reshape(nph, n, lin, g, cg)
  w = kernel.astype(dt).reshape(ntaps, cg, g, tg).transpose(0, 3, 2, 1)
  gf = geometry.out_to_flat(gy.astype(dt), geo).reshape(n, length, g, tg)
  # gbig[:, mo + l] = gy at extended output position l, zero elsewhere, so
  # input position q of a tap with offset `off` reads gbig[:, q - off + mo].
  gbig = jnp.pad(gf, ((0, 0), (mo, lin - length), (0, 0), (0, 0)))

  outs = []
  for p in range(nph):
    ptaps = geo.phase_taps(p)
    # Only the grid rows that hold input positions: the padding rows' gradient
    # is cropped anyway (a quarter of the work for 8x8 inputs).
    q0, q1 = geo.phase_interior(p)
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
  return geometry.from_flat(dxf, geo)


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
  if _no_tap_reads_padding(geo):  # Static: no tap reads padding.
    return dw
  pad_reads = _traced_pad_reads(geo)
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


class XlaBackend(protocol.Backend):
  """``implementation='xla'``: the patch-free XLA kernels of this module.

  Runs on every platform; ``implementation=None`` lowers to it on CPU. It is
  also the base class of the accelerator backends: a subclass overrides the
  reductions its kernels specialise and calls ``super()`` for the others
  (and for the inputs its kernels do not take), which run these kernels
  with the subclass's ``config``.

  Args:
    config: the tuning (:data:`CONFIG`, measured on XLA:CPU, by default).

  Examples:
    >>> import jax.numpy as jnp
    >>> from adderjax.ops import geometry, xla_backend
    >>> class Doubled(xla_backend.XlaBackend):  # a specialised forward pass
    ...   name = 'doubled'
    ...   def forward(self, x, kernel, geo, *, precision=None):
    ...     return 2 * super().forward(x, kernel, geo, precision=precision)
    >>> geo = geometry.make_geometry((1, 3, 3, 1), (2, 2, 1, 1), 1, 'VALID',
    ...                              1, 1)
    >>> x, w = jnp.ones((1, 3, 3, 1)), jnp.zeros((2, 2, 1, 1))
    >>> Doubled().forward(x, w, geo)[0, :, :, 0].tolist()
    [[-8.0, -8.0], [-8.0, -8.0]]
    >>> Doubled().weight_grad(x, w, -jnp.ones((1, 2, 2, 1)), geo,
    ...                       'full_precision').shape  # inherited
    (2, 2, 1, 1)
  """

  name = 'xla'

  def __init__(self, config: XlaConfig = CONFIG):
    self.config = config

  def forward(self, x, kernel, geo, *, precision=None):
    del precision  # No matmul in the forward pass.
    return conv_forward(x, kernel, geo, terms=self.config.forward_terms,
                        tile_bytes=self.config.tile_bytes)

  def input_grad(self, x, kernel, gy, geo, mode, *, precision=None):
    return conv_input_grad(x, kernel, gy, geo, mode,
                           terms=self.config.input_grad_terms,
                           precision=precision,
                           tile_bytes=self.config.tile_bytes)

  def weight_grad(self, x, kernel, gy, geo, mode, *, precision=None):
    return conv_weight_grad(x, kernel, gy, geo, mode, precision=precision)
