"""Argument checks and layout helpers shared by the patch-free conv kernels."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import _util
from pallas_kernels.conv_spec import ConvSpec
from pallas_kernels.conv_spec import ConvSpecLike


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static sizes of one 2-D grouped adder convolution."""
  n: int
  h: int
  w: int
  c: int          # channels per group
  t: int          # output channels per group
  groups: int
  kh: int
  kw: int
  oh: int
  ow: int
  spec: ConvSpec  # always 2-D


def check_conv_args(x, w, spec: ConvSpecLike, g=None
                    ) -> tuple[jax.Array, jax.Array, jax.Array | None,
                               Geometry, bool]:
  """Validates ``x``, ``w`` (and the cotangent ``g``); lifts 1-D to 2-D.

  Returns:
    ``(x, w, g, geometry, was_1d)`` with ``x`` ``(N, H, W, C)``, ``w``
    ``(KH, KW, C // groups, T)`` and ``g`` ``(N, OH, OW, T)``.

  Raises:
    TypeError: ``spec`` is neither a :class:`ConvSpec` nor a geometry with
      its attributes (:meth:`ConvSpec.of`), or non-float operands.
    ValueError: ranks, channel counts or cotangent shape that do not match.
    NotImplementedError: 3-D (or higher) convolutions.
  """
  spec = ConvSpec.of(spec)
  nsp = spec.ndim
  if x.ndim != nsp + 2 or w.ndim != nsp + 2:
    raise ValueError(f'a {nsp}-D spec takes x (N, *spatial, C) and w '
                     f'(*kernel, C // groups, T) of rank {nsp + 2}, got x '
                     f'{x.shape} and w {w.shape}.')
  for name, a in (('x', x), ('w', w)) + ((('g', g),) if g is not None
                                          else ()):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise TypeError(f'{name} must have a floating dtype, got {a.dtype}.')
  spec2 = spec.as_2d()
  was_1d = nsp == 1
  if was_1d:
    x, w = x[:, None], w[None]
    if g is not None:
      if g.ndim != 3:
        raise ValueError(f'cotangent g must have rank 3 for a 1-D conv, got '
                         f'{g.shape}.')
      g = g[:, None]
  n, h, wd, c = x.shape
  kh, kw, cg, t = w.shape
  groups = spec.groups
  if c != cg * groups:
    raise ValueError(f'x has {c} channels but w {w.shape} with groups='
                     f'{groups} expects {cg * groups}.')
  if t % groups:
    raise ValueError(f'w has {t} output channels, not divisible by groups='
                     f'{groups}.')
  if min(n, h, wd, c, kh, kw, t) < 1:
    raise ValueError(f'empty operand: x {x.shape}, w {w.shape}.')
  oh, ow = spec2.output_spatial((h, wd), (kh, kw))
  if g is not None and tuple(g.shape) != (n, oh, ow, t):
    raise ValueError(f'cotangent g must have shape {(n, oh, ow, t)} (the '
                     f'forward output), got {g.shape}.')
  geo = Geometry(n=n, h=h, w=wd, c=cg, t=t // groups, groups=groups, kh=kh,
                 kw=kw, oh=oh, ow=ow, spec=spec2)
  return x, w, g, geo, was_1d


def check_mode(mode: str) -> None:
  _util.check_mode(mode)


def grad_term(mode: str, d, g_row):
  """``g * h(d)`` with ``d = w - x``, keeping a NaN of ``d`` or ``g``."""
  if mode == 'sign':  # d * g: zero for d == 0, NaN for a NaN d or g.
    return jnp.where(d > 0, g_row, jnp.where(d < 0, -g_row, d * g_row))
  return g_row * _util.hardtanh_like(mode, d)
