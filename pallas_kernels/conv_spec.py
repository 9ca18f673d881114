"""Geometry of a patch-free adder convolution: strides, padding, dilation.

The patch-free kernels (:mod:`pallas_kernels.conv_tpu`,
:mod:`pallas_kernels.conv_gpu`) take the activation ``x`` in flax's
feature-last layout ``(N, *spatial, C)`` and the kernel in flax's Conv layout
``(*kernel_spatial, C // groups, T)``; a :class:`ConvSpec` holds the rest of
the geometry, already canonical (explicit ``(lo, hi)`` padding pairs, one
stride and dilation per spatial dim), so that it is hashable and can be a
static argument of ``jax.jit``.

The kernels take any :class:`ConvSpecLike`: a :class:`ConvSpec`, or a richer
geometry that carries the same four attributes, such as the one geometry type
of the adder op, ``adderjax.ops.geometry.ConvGeometry``, which the op passes
as it is; the kernels read their :class:`ConvSpec` from it
(:meth:`ConvSpec.of`). This leaf package does not import ``adderjax``, so it
reads the attributes rather than the type; ``ConvSpec`` is what a direct
caller of the kernels, who has no ``adderjax`` geometry, writes.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

#: The attributes a geometry needs for the kernels (:meth:`ConvSpec.of`).
SPEC_FIELDS = ('strides', 'padding', 'dilation', 'groups')


class ConvSpecLike(Protocol):
  """Any geometry the kernels take: these four attributes, canonical."""
  strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  dilation: tuple[int, ...]
  groups: int


def _int_tuple(name: str, value, n: int | None = None) -> tuple[int, ...]:
  try:
    out = tuple(value)
  except TypeError:
    raise TypeError(f'ConvSpec.{name} must be a tuple of ints, got '
                    f'{value!r}.') from None
  for v in out:
    if isinstance(v, bool) or not isinstance(v, int):
      raise TypeError(f'ConvSpec.{name} must hold ints, got {value!r}.')
  if n is not None and len(out) != n:
    raise ValueError(f'ConvSpec.{name} must have one entry per spatial dim '
                     f'({n}), got {value!r}.')
  return out


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """Strides, zero padding, kernel dilation and groups of an adder conv.

  Attributes:
    strides: one positive stride per spatial dim.
    padding: one ``(lo, hi)`` pair of non-negative ints per spatial dim; the
      padded zeros enter the l1 distance (as zeros enter a conv's products).
    dilation: one positive kernel (rhs) dilation per spatial dim.
    groups: feature groups (``C`` and ``T`` are both divisible by it).

  Examples:
    >>> from pallas_kernels.conv_spec import ConvSpec
    >>> spec = ConvSpec(strides=(2, 2), padding=((1, 1), (1, 1)),
    ...                 dilation=(1, 1), groups=1)
    >>> spec.output_spatial((32, 32), (3, 3))
    (16, 16)
    >>> hash(spec) == hash(ConvSpec((2, 2), ((1, 1), (1, 1)), (1, 1), 1))
    True
    >>> ConvSpec(strides=(0, 1), padding=((0, 0), (0, 0)), dilation=(1, 1),
    ...          groups=1)
    Traceback (most recent call last):
    ...
    ValueError: ConvSpec.strides must be positive, got (0, 1).
  """
  strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  dilation: tuple[int, ...]
  groups: int = 1

  def __post_init__(self):
    strides = _int_tuple('strides', self.strides)
    n = len(strides)
    if n < 1:
      raise ValueError(f'ConvSpec.strides must have at least one spatial dim, '
                       f'got {self.strides!r}.')
    dilation = _int_tuple('dilation', self.dilation, n)
    try:
      padding = tuple(_int_tuple('padding', p, 2) for p in self.padding)
    except (TypeError, ValueError):
      raise ValueError(f'ConvSpec.padding must be one (lo, hi) pair of ints '
                       f'per spatial dim, got {self.padding!r}.') from None
    if len(padding) != n:
      raise ValueError(f'ConvSpec.padding must have one (lo, hi) pair per '
                       f'spatial dim ({n}), got {self.padding!r}.')
    if min(strides) < 1:
      raise ValueError(f'ConvSpec.strides must be positive, got '
                       f'{self.strides!r}.')
    if min(dilation) < 1:
      raise ValueError(f'ConvSpec.dilation must be positive, got '
                       f'{self.dilation!r}.')
    if min(min(p) for p in padding) < 0:
      raise ValueError(f'ConvSpec.padding must be non-negative, got '
                       f'{self.padding!r}.')
    groups = self.groups
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
      raise ValueError(f'ConvSpec.groups must be a positive int, got '
                       f'{groups!r}.')
    object.__setattr__(self, 'strides', strides)
    object.__setattr__(self, 'dilation', dilation)
    object.__setattr__(self, 'padding', padding)

  @classmethod
  def of(cls, geometry: ConvSpecLike) -> ConvSpec:
    """The spec of ``geometry``: itself if a :class:`ConvSpec`, else the spec
    of its ``strides``, ``padding``, ``dilation`` and ``groups``.

    Raises:
      TypeError: ``geometry`` lacks one of those attributes, or holds
        non-integers.
      ValueError: values that make no valid spec.

    Examples:
      >>> import collections
      >>> from pallas_kernels.conv_spec import ConvSpec
      >>> Geo = collections.namedtuple('Geo', 'in_shape strides padding '
      ...                              'dilation groups')
      >>> geo = Geo((2, 9, 9, 4), (2, 2), ((1, 1), (1, 1)), (1, 1), 2)
      >>> ConvSpec.of(geo) == ConvSpec((2, 2), ((1, 1), (1, 1)), (1, 1), 2)
      True
      >>> ConvSpec.of((1, 1))  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      TypeError: spec must be a pallas_kernels.conv_spec.ConvSpec or a ...
    """
    if isinstance(geometry, cls):
      return geometry
    try:
      fields = {name: getattr(geometry, name) for name in SPEC_FIELDS}
    except AttributeError:
      raise TypeError(
          f'spec must be a pallas_kernels.conv_spec.ConvSpec or a geometry '
          f'with strides, padding, dilation and groups (such as '
          f'adderjax.ops.geometry.ConvGeometry), got {geometry!r}.') from None
    return cls(**fields)

  @property
  def ndim(self) -> int:
    """Number of spatial dims."""
    return len(self.strides)

  def output_spatial(self, in_spatial, kernel_spatial) -> tuple[int, ...]:
    """Output spatial sizes (as ``lax.conv_general_dilated``'s).

    Raises:
      ValueError: mismatched ranks, or a dilated kernel larger than the padded
        input (an empty output).
    """
    in_spatial, kernel_spatial = tuple(in_spatial), tuple(kernel_spatial)
    if len(in_spatial) != self.ndim or len(kernel_spatial) != self.ndim:
      raise ValueError(f'input spatial {in_spatial} and kernel spatial '
                       f'{kernel_spatial} must both have {self.ndim} dims.')
    out = []
    for n, k, s, d, (lo, hi) in zip(in_spatial, kernel_spatial, self.strides,
                                    self.dilation, self.padding):
      span = (k - 1) * d + 1
      if n + lo + hi < span:
        raise ValueError(f'dilated kernel extent {span} exceeds the padded '
                         f'input {n + lo + hi} (input spatial {in_spatial}, '
                         f'kernel {kernel_spatial}, spec {self}).')
      out.append((n + lo + hi - span) // s + 1)
    return tuple(out)

  def as_2d(self) -> 'ConvSpec':
    """A 1-D spec as the equivalent 2-D one over ``H = 1`` (2-D unchanged).

    Raises:
      NotImplementedError: three or more spatial dims.
    """
    if self.ndim == 2:
      return self
    if self.ndim == 1:
      return ConvSpec(strides=(1,) + self.strides,
                      padding=((0, 0),) + self.padding,
                      dilation=(1,) + self.dilation, groups=self.groups)
    raise NotImplementedError(
        f'the patch-free kernels take 1-D and 2-D convolutions, got '
        f'{self.ndim} spatial dims ({self}).')
