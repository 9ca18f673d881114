"""Small shape helpers shared by the GPU and TPU kernel wrappers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

GRAD_MODES = ('full_precision', 'sign', 'unclipped')


def round_up(n: int, multiple: int) -> int:
  """Smallest multiple of ``multiple`` that is ``>= n``."""
  return -(-n // multiple) * multiple


def next_power_of_2(n: int) -> int:
  """Smallest power of two ``>= n`` (``n >= 1``)."""
  return 1 << max(0, int(n) - 1).bit_length()


def is_power_of_2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def pad_to(a: jax.Array, axis: int, size: int) -> jax.Array:
  """Zero-pads ``a`` along ``axis`` up to ``size`` (no-op if already there)."""
  extra = size - a.shape[axis]
  if extra < 0:
    raise ValueError(f'cannot pad axis {axis} of shape {a.shape} down to '
                     f'{size}.')
  if not extra:
    return a
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, extra)
  return jnp.pad(a, widths)


def check_layout(p, w, gy=None) -> tuple[int, int, int, int]:
  """Validates the canonical patch layout and returns ``(G, K, M, T)``.

  Raises:
    ValueError: wrong ranks or mismatched ``G`` / ``K`` / ``T`` / ``M``.
    TypeError: non-floating operands.
  """
  if p.ndim != 3 or w.ndim != 3:
    raise ValueError(f'expected patches P[G, K, M] and kernel W[G, K, T], got '
                     f'shapes {p.shape} and {w.shape}.')
  g, k, m = p.shape
  if w.shape[:2] != (g, k):
    raise ValueError(f'patches of shape {p.shape} (G={g}, K={k}) do not match '
                     f'a kernel of shape {w.shape}.')
  t = w.shape[2]
  for name, a in (('P', p), ('W', w)) + ((('gy', gy),) if gy is not None
                                          else ()):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise TypeError(f'{name} must have a floating dtype, got {a.dtype}.')
  if gy is not None and tuple(gy.shape) != (g, t, m):
    raise ValueError(f'output cotangent must have shape (G, T, M) = '
                     f'{(g, t, m)}, got {gy.shape}.')
  if min(g, k, m, t) < 1:
    raise ValueError(f'empty operand: P {p.shape}, W {w.shape}.')
  return g, k, m, t


def check_mode(mode: str) -> None:
  if mode not in GRAD_MODES:
    raise ValueError(f'mode must be one of {GRAD_MODES}, got {mode!r}.')


def hardtanh_like(mode: str, d: jax.Array) -> jax.Array:
  """``h(d)`` of the input gradient: HardTanh, sign or identity."""
  if mode == 'full_precision':
    return jnp.minimum(jnp.maximum(d, -1.0), 1.0)
  if mode == 'sign':  # NaN for a NaN d (d * 0), as jnp.sign.
    one = jnp.ones_like(d)
    return jnp.where(d > 0, one, jnp.where(d < 0, -one, d * 0))
  return d


def lane_chunks(n: int, lanes: int, chunk_fn, acc):
  """Applies ``chunk_fn(offset, size, acc)`` over ``n`` lanes in chunks.

  Full ``lanes``-wide chunks run in a ``fori_loop`` whose offsets are
  provably multiples of ``lanes`` (Mosaic needs dynamic lane offsets aligned
  to 128); a shorter tail chunk (when ``n`` is the whole, unpadded axis) is
  static.
  """
  n_full, tail = divmod(n, lanes)
  if n_full == 1:
    acc = chunk_fn(0, lanes, acc)
  elif n_full > 1:
    acc = lax.fori_loop(
        0, n_full,
        lambda c, a: chunk_fn(pl.multiple_of(c * lanes, lanes), lanes, a),
        acc)
  if tail:
    acc = chunk_fn(n_full * lanes, tail, acc)
  return acc
