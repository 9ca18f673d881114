"""Argument canonicalisation and patch extraction for adder convolutions.

Everything here is shape bookkeeping shared by every backend: it turns the
user-facing ``strides`` / ``padding`` / ``kernel_dilation`` arguments into a
frozen, hashable :class:`ConvGeometry`, the one type that describes a
convolution (its output shape, its patch sizes and the flat shifted-phase
layout of the patch-free XLA kernels are derived properties of it; the Pallas
kernels read their spec from it), and moves between the feature-last input
layout and the canonical *patch layout* that the l1 kernels work on:

* ``P``: ``[G, K, M]`` patches, ``G`` groups, ``K = prod(kernel_size) * C_in/G``
  (taps-major, channel-minor, the row-major order of a flax kernel), ``M`` the
  number of output positions ``N * prod(out_spatial)``.
* ``W``: ``[G, K, T]`` the kernel, ``T = C_out / G``.
* ``Y``: ``[G, T, M]`` the output.

``M`` is last so the long axis is contiguous: it is the vector axis of the XLA
loops and the lane axis of the TPU kernels.

Shape polymorphism (``jax.export`` with ``jax.export.symbolic_shape``): the
batch dimension of the input may be symbolic in every layer; a spatial
dimension may be symbolic in a layer with unit strides and unit dilation
(any zero padding: ``'SAME'`` then pads by a constant). The kernel and the
feature dimension must be static. :func:`make_geometry` raises a
``ValueError`` naming the symbolic dimension where that does not hold, and
where an output size cannot be proved positive (add a constraint such as
``'h >= 5'`` to ``symbolic_shape``). The geometry arithmetic on symbolic
sizes uses only operations that JAX decides for every value of the symbols
(sums, products, floor division by constants).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PaddingLike = Union[str, int, Sequence[Union[int, tuple[int, int]]]]

#: The backward passes of the adder ops (their ``grad`` argument): the
#: paper's ``'full_precision'`` one, the exact ``'sign'`` subgradients and the
#: ``'unclipped'`` ablation (see :func:`adderjax.adder_conv`).
GRAD_MODES = ('full_precision', 'sign', 'unclipped')


def is_int(value) -> bool:
  """A Python or numpy integer (not a bool, not a float such as ``2.0``)."""
  return (isinstance(value, (int, np.integer)) and
          not isinstance(value, (bool, np.bool_)))


def is_symbolic(dim) -> bool:
  """Whether ``dim`` is a symbolic dimension of ``jax.export`` (not an int)."""
  return jax.export.is_symbolic_dim(dim)


def _static_or_symbolic(dim):
  """A constant dimension as a Python int; a symbolic one unchanged."""
  return dim if is_symbolic(dim) else int(dim)


def as_int_tuple(value, n: int, name: str) -> tuple[int, ...]:
  """Broadcasts an int (or validates a sequence) to ``n`` positive ints.

  ``None`` means 1. Raises ``TypeError`` for non-integers (a float such as
  1.5 is not truncated) and ``ValueError`` for a wrong length or a value
  below 1, naming ``name`` and the value.
  """
  if value is None:
    value = 1
  if is_int(value):
    out = (int(value),) * n
  else:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
      raise TypeError(f'{name} must be an int or a sequence of {n} ints, '
                      f'got {value!r}.')
    if not all(is_int(v) for v in value):
      raise TypeError(f'{name} must hold ints, got {value!r} (a float such '
                      f'as 1.5 is not truncated).')
    out = tuple(int(v) for v in value)
    if len(out) != n:
      raise ValueError(f'{name} must have {n} entries (one per spatial '
                       f'dimension), got {value!r}.')
  if any(v < 1 for v in out):
    raise ValueError(f'{name} must be positive, got {value!r}.')
  return out


def canonicalize_padding(padding: PaddingLike, kernel_size: Sequence[int],
                         strides: Sequence[int], dilation: Sequence[int],
                         in_spatial: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """Turns any accepted padding form into explicit ``(lo, hi)`` pairs.

  Args:
    padding: ``'SAME'``, ``'VALID'``, an int (same on both sides of every
      spatial dim), a sequence of ints (one per dim, both sides) or of
      ``(lo, hi)`` pairs.
    kernel_size: spatial kernel shape.
    strides: spatial strides.
    dilation: kernel dilation.
    in_spatial: spatial input shape.

  Returns:
    One ``(lo, hi)`` pair of non-negative ints per spatial dimension.

  Raises:
    ValueError: unknown padding string, wrong number of entries, or negative
      padding.
    TypeError: padding of an unsupported type.
  """
  n = len(kernel_size)
  if isinstance(padding, str):
    name = padding.upper()
    if name not in ('SAME', 'VALID'):
      raise ValueError(
          f"padding must be 'SAME', 'VALID', an int or (lo, hi) pairs, got "
          f'{padding!r} (CIRCULAR/REFLECT/CAUSAL are handled by the Flax '
          'modules, which pad the input first).')
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
    pads = lax.padtype_to_pads(tuple(in_spatial), dilated, tuple(strides), name)
    return tuple((int(lo), int(hi)) for lo, hi in pads)
  if is_int(padding):
    pairs = [(int(padding), int(padding))] * n
  elif isinstance(padding, Sequence):
    if len(padding) != n:
      raise ValueError(f'padding must have {n} entries (one per spatial '
                       f'dimension), got {padding!r}.')
    pairs = []
    for p in padding:
      if is_int(p):
        pairs.append((int(p), int(p)))
      elif (isinstance(p, Sequence) and not isinstance(p, (str, bytes)) and
            len(p) == 2):
        if not (is_int(p[0]) and is_int(p[1])):
          raise TypeError(f'padding pairs must hold ints, got {p!r} in '
                          f'padding={padding!r}.')
        pairs.append((int(p[0]), int(p[1])))
      else:
        raise ValueError(f'each padding entry must be an int or a (lo, hi) '
                         f'pair, got {p!r} in padding={padding!r}.')
  else:
    raise TypeError(f'padding must be a string, an int or a sequence, got '
                    f'{padding!r}.')
  if any(lo < 0 or hi < 0 for lo, hi in pairs):
    raise ValueError(f'padding must be non-negative, got {padding!r}.')
  return tuple(pairs)


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
  """Static description of one adder convolution (hashable, jit-static).

  The one geometry type of the op: the output shape, the patch sizes
  (``k``, ``m``) and the flat shifted-phase layout of the XLA kernels
  (``phase_grid``, ``tap_offsets``, ...) are derived from the fields, and
  the Pallas kernels take it as their spec (they read ``strides``,
  ``padding``, ``dilation`` and ``groups``).

  Attributes:
    in_shape: input shape ``(N, *spatial, C_in)``.
    kernel_size: spatial kernel shape.
    in_features: ``C_in``.
    out_features: ``C_out``.
    strides: per spatial dim.
    padding: explicit ``(lo, hi)`` per spatial dim.
    dilation: kernel dilation per spatial dim.
    groups: feature group count.
  """
  in_shape: tuple[int, ...]
  kernel_size: tuple[int, ...]
  in_features: int
  out_features: int
  strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  dilation: tuple[int, ...]
  groups: int

  @property
  def batch(self) -> int:
    """``N``: an int, or a symbolic dimension under ``jax.export``."""
    return self.in_shape[0]

  @property
  def symbolic_batch(self) -> bool:
    """Whether the batch is a symbolic dimension (``jax.export``)."""
    return is_symbolic(self.batch)

  @property
  def symbolic_spatial(self) -> bool:
    """Whether a spatial input size is a symbolic dimension."""
    return any(is_symbolic(d) for d in self.in_shape[1:-1])

  @property
  def symbolic(self) -> bool:
    """Whether any input size (batch or spatial) is symbolic."""
    return self.symbolic_batch or self.symbolic_spatial

  @property
  def out_spatial(self) -> tuple[int, ...]:
    out = []
    for size, k, s, d, (lo, hi) in zip(self.in_shape[1:-1], self.kernel_size,
                                       self.strides, self.dilation,
                                       self.padding):
      out.append((size + lo + hi - (k - 1) * d - 1) // s + 1)
    return tuple(out)

  @property
  def out_shape(self) -> tuple[int, ...]:
    return (self.batch, *self.out_spatial, self.out_features)

  @property
  def taps(self) -> int:
    return math.prod(self.kernel_size)

  @property
  def k(self) -> int:
    """Reduction length per output: taps * C_in / groups."""
    return self.taps * (self.in_features // self.groups)

  @property
  def m(self) -> int:
    """Number of output positions (batch included)."""
    return self.batch * math.prod(self.out_spatial)

  # The flat shifted-phase layout of the patch-free XLA kernels (see the
  # comment above :func:`to_flat`).

  @functools.cached_property
  def phase_grid(self) -> tuple[int, ...]:
    """Phase-grid shape ``Q_d = ceil(padded_d / s_d)`` per spatial dim."""
    return tuple(-(-(size + lo + hi) // s) for size, (lo, hi), s in
                 zip(self.in_shape[1:-1], self.padding, self.strides))

  @property
  def ext_grid(self) -> tuple[int, ...]:
    """Extended output grid ``(O_0, Q_1, ..., Q_{D-1})`` of the flat layout."""
    return (self.out_spatial[0],) + self.phase_grid[1:]

  @functools.cached_property
  def phases(self) -> tuple[tuple[int, ...], ...]:
    """Phase multi-indices, row-major over ``strides``."""
    return tuple(itertools.product(*[range(s) for s in self.strides]))

  @functools.cached_property
  def tap_offsets(self) -> tuple[tuple[int, int], ...]:
    """Per kernel tap (row-major over ``kernel_size``, the order of a flax
    kernel), the ``(phase index, flat offset)`` it reads."""
    grid = self.phase_grid
    flat_strides = [math.prod(grid[d + 1:]) for d in range(len(grid))]
    taps = []
    for tap in itertools.product(*[range(k) for k in self.kernel_size]):
      pos = [t * d for t, d in zip(tap, self.dilation)]
      phase = tuple(p % s for p, s in zip(pos, self.strides))
      off = sum((p // s) * f for p, s, f in zip(pos, self.strides,
                                                flat_strides))
      taps.append((self.phases.index(phase), off))
    return tuple(taps)

  @property
  def max_offset(self) -> int:
    """Largest flat offset of a tap."""
    return max(off for _, off in self.tap_offsets)

  @property
  def flat_length_out(self) -> int:
    """Flat length of the extended output grid."""
    return math.prod(self.ext_grid)

  @property
  def flat_length_in(self) -> int:
    """Flat length of each input phase (``>= prod(phase_grid)``, zero tail)."""
    return max(math.prod(self.phase_grid),
               self.flat_length_out + self.max_offset)

  def phase_interior(self, phase: int) -> tuple[int, int]:
    """Flat range ``[q0, q1)`` of ``phase`` holding all its input positions.

    Whole grid rows of the first spatial dim whose padded coordinate lies
    in the input (not in the padding): the only rows whose gradient is kept.
    """
    a, s = self.phases[phase][0], self.strides[0]
    lo, size = self.padding[0][0], self.in_shape[1]
    r0 = max(0, -(-(lo - a) // s))
    r1 = max(r0, -(-(lo + size - a) // s))
    rest = math.prod(self.phase_grid[1:])
    return r0 * rest, r1 * rest

  def phase_taps(self, phase: int) -> tuple[tuple[int, int], ...]:
    """``(tap index, offset)`` of the taps that read ``phase``."""
    return tuple((i, off) for i, (ph, off) in enumerate(self.tap_offsets)
                 if ph == phase)


def _check_symbolic_spatial(x_shape, strides, dilation) -> None:
  """A symbolic spatial size needs unit strides and dilation (named if not)."""
  for i, d in enumerate(x_shape[1:-1]):
    if not is_symbolic(d):
      continue
    if strides[i] != 1 or dilation[i] != 1:
      raise ValueError(
          f'input spatial dimension {i} is the symbolic dimension {str(d)!r} '
          f'(input shape {_shape_str(x_shape)}): an adder convolution with a '
          f'symbolic spatial size needs strides 1 and kernel_dilation 1 in '
          f'that dimension, got strides {tuple(strides)} and kernel_dilation '
          f'{tuple(dilation)}; export with a static size for it (only the '
          'batch may be symbolic in every layer).')


def _shape_str(shape) -> str:
  return '(' + ', '.join(str(d) for d in shape) + (',)' if len(shape) == 1
                                                   else ')')


def _output_size_error(geo: 'ConvGeometry', dim: int) -> ValueError:
  """The error for a symbolic output size JAX cannot prove positive."""
  size, out = geo.in_shape[1 + dim], geo.out_spatial[dim]
  need = ((geo.kernel_size[dim] - 1) * geo.dilation[dim] + 1 -
          sum(geo.padding[dim]))
  return ValueError(
      f'input spatial dimension {dim} is the symbolic dimension {str(size)!r} '
      f'and the output size {str(out)!r} (kernel size {geo.kernel_size}, '
      f'padding {geo.padding}) cannot be proved positive from it: JAX decides '
      f'sums and products of dimension variables only when each is known to '
      f"be >= 1. Write that input size as '{size} + {need - 1}' in "
      f"jax.export.symbolic_shape (then the output size is '{size}'), or "
      "pad the layer so that it keeps the size ('SAME').")


def _check_output_size(geo: 'ConvGeometry') -> None:
  """Every output size must be at least 1 (provably, for symbolic sizes).

  For a symbolic size, the sizes of the layer's layouts (products of the
  output and padded sizes) must be decidable too, which holds when every
  output size is a dimension variable plus a non-negative constant.
  """
  inconclusive = jax.errors.InconclusiveDimensionOperation
  for i, o in enumerate(geo.out_spatial):
    try:
      small = o < 1
    except inconclusive:
      raise _output_size_error(geo, i) from None
    if small:
      raise ValueError(
          f'input spatial shape {_shape_str(geo.in_shape[1:-1])} with padding '
          f'{geo.padding} is smaller than the dilated kernel '
          f'{geo.kernel_size} (dilation {geo.dilation}); the output would '
          f'have spatial shape {_shape_str(geo.out_spatial)}.')
  if not geo.symbolic_spatial:
    return
  try:
    decidable = (geo.flat_length_out >= 1 and geo.flat_length_in >= 1 and
                 math.prod(geo.out_spatial) >= 1)
  except inconclusive:
    decidable = False
  if not decidable:
    dims = [i for i, (size, o) in enumerate(zip(geo.in_shape[1:-1],
                                                geo.out_spatial))
            if is_symbolic(size) and o != size]
    raise _output_size_error(geo, dims[0] if dims else 0)


def make_geometry(x_shape, kernel_shape, strides, padding, kernel_dilation,
                  feature_group_count) -> ConvGeometry:
  """Validates conv arguments and returns their :class:`ConvGeometry`.

  ``x_shape`` may hold symbolic dimensions of ``jax.export``: the batch in
  every layer, a spatial size where the stride and dilation of that
  dimension are 1 (see the module docstring).

  Raises:
    ValueError: a shape, padding, stride, dilation or group count that does not
      make a valid convolution, or a symbolic dimension where the geometry
      needs a static one; the message names the offending value.

  Examples:
    >>> import jax
    >>> from adderjax.ops import geometry
    >>> b, h = jax.export.symbolic_shape('b, h', constraints=['h >= 3'])
    >>> geo = geometry.make_geometry((b, h, 8, 1), (3, 3, 1, 4), 1, 'VALID',
    ...                              1, 1)
    >>> geo.out_shape
    (b, h - 2, 6, 4)
    >>> geometry.make_geometry((b, h, 8, 1), (3, 3, 1, 4), 2, 'VALID', 1, 1)
    Traceback (most recent call last):
    ...
    ValueError: input spatial dimension 0 is the symbolic dimension 'h' (input shape (b, h, 8, 1)): an adder convolution with a symbolic spatial size needs strides 1 and kernel_dilation 1 in that dimension, got strides (2, 2) and kernel_dilation (1, 1); export with a static size for it (only the batch may be symbolic in every layer).
  """
  x_shape = tuple(_static_or_symbolic(d) for d in x_shape)
  if any(is_symbolic(d) for d in kernel_shape):
    raise ValueError(f'kernel shape must be static, got the symbolic shape '
                     f'{_shape_str(kernel_shape)}.')
  kernel_shape = tuple(int(d) for d in kernel_shape)
  nsp = len(kernel_shape) - 2
  if nsp < 1:
    raise ValueError(f'kernel must have shape (*kernel_size, in_features // '
                     f'groups, out_features) with at least one spatial dim, '
                     f'got shape {kernel_shape}.')
  if len(x_shape) != nsp + 2:
    raise ValueError(
        f'input of shape {_shape_str(x_shape)} (rank {len(x_shape)}) does not '
        f'match a kernel with {nsp} spatial dims (shape {kernel_shape}): '
        f'expected a feature-last input of rank {nsp + 2} (batch, {nsp} '
        'spatial dims, features).')
  if is_symbolic(x_shape[-1]):
    raise ValueError(
        f'the feature dimension of the input (shape {_shape_str(x_shape)}) is '
        f'the symbolic dimension {str(x_shape[-1])!r}; it must be static (the '
        'kernel fixes it).')
  if not isinstance(feature_group_count, (int, np.integer)) or isinstance(
      feature_group_count, bool) or feature_group_count < 1:
    raise ValueError(f'feature_group_count must be a positive int, got '
                     f'{feature_group_count!r}.')
  groups = int(feature_group_count)
  c_in, c_out = x_shape[-1], kernel_shape[-1]
  if c_in % groups:
    raise ValueError(f'feature_group_count={groups} does not divide the '
                     f'input features {c_in}.')
  if c_out % groups:
    raise ValueError(f'feature_group_count={groups} does not divide the '
                     f'output features {c_out} (kernel shape {kernel_shape}).')
  if kernel_shape[-2] * groups != c_in:
    raise ValueError(
        f'kernel shape {kernel_shape} expects {kernel_shape[-2]} features per '
        f'group x {groups} groups = {kernel_shape[-2] * groups} input '
        f'features, but the input of shape {_shape_str(x_shape)} has {c_in}.')
  if any(d < 1 for d in kernel_shape):
    raise ValueError(f'kernel shape must be positive, got {kernel_shape}.')
  kernel_size = kernel_shape[:-2]
  strides_t = as_int_tuple(strides, nsp, 'strides')
  dilation_t = as_int_tuple(kernel_dilation, nsp, 'kernel_dilation')
  _check_symbolic_spatial(x_shape, strides_t, dilation_t)
  pads = canonicalize_padding(padding, kernel_size, strides_t, dilation_t,
                              x_shape[1:-1])
  geo = ConvGeometry(x_shape, kernel_size, c_in, c_out, strides_t, pads,
                     dilation_t, groups)
  _check_output_size(geo)
  return geo


def extract_patches(x: jax.Array, geo: ConvGeometry) -> jax.Array:
  """Feature-last input -> patches ``[G, K, M]`` (zero padding included).

  Linear in ``x``; its transpose (``jax.linear_transpose`` / ``jax.vjp``) is
  the col2im that scatters patch gradients back onto the input.
  """
  n, c = geo.batch, geo.in_features
  g = geo.groups
  cg = c // g
  x = lax.pad(x, jnp.zeros((), x.dtype),
              [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in geo.padding] +
              [(0, 0, 0)])
  out_sp = geo.out_spatial
  slabs = []
  for tap in itertools.product(*[range(k) for k in geo.kernel_size]):
    start = [0] + [t * d for t, d in zip(tap, geo.dilation)] + [0]
    limit = [n] + [s0 + (o - 1) * st + 1 for s0, o, st in
                   zip(start[1:-1], out_sp, geo.strides)] + [c]
    slabs.append(lax.slice(x, start, limit, (1, *geo.strides, 1)))
  p = jnp.stack(slabs, 0)  # [taps, N, *out, C]
  p = p.reshape(geo.taps, geo.m, g, cg)
  p = p.transpose(2, 0, 3, 1)  # [G, taps, Cg, M]
  return p.reshape(g, geo.k, geo.m)


def kernel_to_canonical(kernel: jax.Array, geo: ConvGeometry) -> jax.Array:
  """Flax kernel ``(*ks, C_in/G, C_out)`` -> ``W`` of shape ``[G, K, T]``."""
  g = geo.groups
  w = kernel.reshape(geo.k, g, geo.out_features // g)
  return w.transpose(1, 0, 2)


def kernel_from_canonical(w: jax.Array, geo: ConvGeometry) -> jax.Array:
  """Inverse of :func:`kernel_to_canonical`."""
  return w.transpose(1, 0, 2).reshape(
      *geo.kernel_size, geo.in_features // geo.groups, geo.out_features)


def output_from_canonical(y: jax.Array, geo: ConvGeometry) -> jax.Array:
  """``Y`` of shape ``[G, T, M]`` -> feature-last output ``(N, *out, C_out)``."""
  y = y.reshape(geo.out_features, geo.m)
  return y.T.reshape(geo.out_shape)


def output_to_canonical(y: jax.Array, geo: ConvGeometry) -> jax.Array:
  """Feature-last output (or its cotangent) -> ``[G, T, M]``."""
  g = geo.groups
  return y.reshape(geo.m, geo.out_features).T.reshape(
      g, geo.out_features // g, geo.m)


# --- The flat shifted-phase layout of the patch-free XLA kernels -------------
#
# A stride-1 convolution reads, for kernel tap ``i``, the padded input shifted
# by ``i``. Flatten the padded spatial grid row-major and compute the output
# on an *extended* grid that keeps the padded row length: output position
# ``l`` then reads flat input position ``l + offset(tap)`` for every tap, so
# each tap is one contiguous slice of the flat input and no patch matrix is
# built. The extended grid has ``Q_d - O_d`` junk columns in every trailing
# spatial dim (they read wrapped-around values and are cropped away).
# Strides split the padded input into ``prod(strides)`` phases (sub-grids of
# step ``s``); tap ``i`` reads phase ``(i * d) % s`` shifted by ``(i * d) // s``
# grid steps, so strided and dilated convolutions become the same contiguous
# slices of one phase each. The layout's sizes are properties of
# :class:`ConvGeometry` (``phase_grid``, ``ext_grid``, ``phases``,
# ``tap_offsets``, ``flat_length_in``, ``flat_length_out``).


def to_flat(x: jax.Array, geo: ConvGeometry) -> jax.Array:
  """Feature-last input ``(N, *spatial, C)`` -> phases ``[PH, N, Lin, C]``.

  Zero padding (the convolution's, then up to a multiple of the stride, then
  a zero tail) is included. For stride 1 this is a pad and a reshape.

  Examples:
    >>> import jax.numpy as jnp
    >>> from adderjax.ops import geometry
    >>> geo = geometry.make_geometry((1, 4, 4, 1), (3, 3, 1, 1), 2, 1, 1, 1)
    >>> geo.phase_grid, geo.tap_offsets[:3], geo.flat_length_in
    ((3, 3), ((0, 0), (1, 0), (0, 1)), 10)
    >>> geometry.to_flat(jnp.ones((1, 4, 4, 1)), geo).shape  # 4 phases
    (4, 1, 10, 1)
  """
  grid = geo.phase_grid
  nsp = len(grid)
  n, c = geo.batch, geo.in_features
  pads = [(0, 0, 0)]
  for (lo, hi), q, s, size in zip(geo.padding, grid, geo.strides,
                                  geo.in_shape[1:-1]):
    pads.append((lo, q * s - size - lo, 0))
  pads.append((0, 0, 0))
  x = lax.pad(x, jnp.zeros((), x.dtype), pads)
  if any(s > 1 for s in geo.strides):
    shape = [n]
    for q, s in zip(grid, geo.strides):
      shape += [q, s]
    x = x.reshape(*shape, c)
    perm = ([2 + 2 * d for d in range(nsp)] + [0] +
            [1 + 2 * d for d in range(nsp)] + [1 + 2 * nsp])
    x = x.transpose(perm)
  lq = math.prod(grid)
  x = x.reshape(len(geo.phases), n, lq, c)
  return jnp.pad(x, ((0, 0), (0, 0), (0, geo.flat_length_in - lq), (0, 0)))


def from_flat(xf: jax.Array, geo: ConvGeometry) -> jax.Array:
  """Inverse of :func:`to_flat` on the valid region: ``[PH, N, Lin, C]`` ->
  ``(N, *spatial, C)`` (padding cropped)."""
  grid = geo.phase_grid
  nsp = len(grid)
  n, c = geo.batch, xf.shape[-1]
  lq = math.prod(grid)
  x = xf[:, :, :lq].reshape(*geo.strides, n, *grid, c)
  if any(s > 1 for s in geo.strides):
    perm = [nsp]
    for d in range(nsp):
      perm += [nsp + 1 + d, d]
    perm.append(2 * nsp + 1)
    x = x.transpose(perm)
  x = x.reshape(n, *[q * s for q, s in zip(grid, geo.strides)], c)
  starts = [0] + [lo for lo, _ in geo.padding] + [0]
  limits = [n] + [lo + size for (lo, _), size in
                  zip(geo.padding, geo.in_shape[1:-1])] + [c]
  return lax.slice(x, starts, limits)


def out_to_flat(y: jax.Array, geo: ConvGeometry) -> jax.Array:
  """Feature-last output (or its cotangent) ``(N, *out, C)`` -> ``[N, L, C]``
  on the extended grid, junk positions zero."""
  pads = [(0, 0, 0)] + [(0, e - o, 0) for e, o in
                        zip(geo.ext_grid, geo.out_spatial)] + [(0, 0, 0)]
  y = lax.pad(y, jnp.zeros((), y.dtype), pads)
  return y.reshape(geo.batch, geo.flat_length_out, y.shape[-1])


def out_from_flat(y: jax.Array, geo: ConvGeometry) -> jax.Array:
  """``[N, L, C]`` on the extended grid -> ``(N, *out, C)``."""
  y = y.reshape(geo.batch, *geo.ext_grid, y.shape[-1])
  return lax.slice(y, (0,) * y.ndim,
                   (geo.batch, *geo.out_spatial, y.shape[-1]))
