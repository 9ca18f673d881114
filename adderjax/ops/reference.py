"""The reference adder kernels: the paper's formulas on the patch matrix.

Everything here is written on the canonical patch layout of
:mod:`adderjax.ops.geometry` (patches ``P[G, K, M]``, kernel ``W[G, K, T]``,
output / cotangent ``[G, T, M]``), where each formula is one line of the paper:

* :func:`l1_forward`: ``Y = -sum_k |P - W|`` (eq. 2);
* :func:`l1_input_grad`: ``dP = sum_t gy * HardTanh(W - P)`` (eq. 6-7), or
  ``sgn`` / the identity for the ``'sign'`` / ``'unclipped'`` ablations;
* :func:`l1_weight_grad`: ``dW = sum_m gy * (P - W)`` (eq. 5), or ``sgn``.

:func:`conv_forward`, :func:`conv_input_grad` and :func:`conv_weight_grad`
wrap them for the convolution's own arrays (im2col, then col2im for the input
gradient). They materialise the patch matrix, so they are the oracle the
tuned backends (:mod:`adderjax.ops.xla_backend`,
:mod:`adderjax.ops.pallas_backend`) are checked against, not a fast path;
the Pallas backends also use the patch-layout functions for the reductions
that are matmuls (``'unclipped'``).

Everything accumulates in float32 (float64 for float64 inputs); callers cast
back. The two reductions that are matmuls (the full-precision weight gradient
and the ``'unclipped'`` input gradient) are computed on operands centred on
:func:`kernel_shift`, so they do not cancel for inputs far from zero.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
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


def clip_unit(d: jax.Array) -> jax.Array:
  """HardTanh ``clip(d, -1, 1)``; a NaN ``d`` gives NaN.

  Two selects that each compile to one ``vmaxps`` / ``vminps`` on XLA:CPU
  (``jnp.clip`` costs four instructions per bound for the same NaN
  semantics): a NaN fails both comparisons and falls through to ``d``.
  """
  one = jnp.ones((), d.dtype)
  lo = jnp.where(-one > d, -one, d)
  return jnp.where(one < lo, one, lo)


# --- The convolution's own arrays, through the patch matrix ------------------


def conv_forward(x: jax.Array, kernel: jax.Array,
                 geo: geometry.ConvGeometry) -> jax.Array:
  """``-sum |patch - filter|`` through the patch matrix, accumulation dtype.

  Args:
    x: feature-last input ``(N, *spatial, C_in)``.
    kernel: flax kernel ``(*kernel_size, C_in / G, C_out)``.
    geo: the convolution (:func:`adderjax.ops.geometry.make_geometry`).

  Returns:
    ``(N, *out_spatial, C_out)`` in float32 (float64 for float64 inputs).
  """
  p = geometry.extract_patches(x, geo)
  w = geometry.kernel_to_canonical(kernel, geo)
  return geometry.output_from_canonical(l1_forward(p, w), geo)


def col2im(dp: jax.Array, geo: geometry.ConvGeometry,
           x_shape: tuple[int, ...]) -> jax.Array:
  """Sums a patch-layout gradient ``[G, K, M]`` back onto the input.

  The transpose of :func:`adderjax.ops.geometry.extract_patches`, in the
  dtype of ``dp`` (overlapping taps are summed before any cast).
  """
  transpose = jax.linear_transpose(
      functools.partial(geometry.extract_patches, geo=geo),
      jax.ShapeDtypeStruct(x_shape, dp.dtype))
  return transpose(dp)[0]


def conv_input_grad(x: jax.Array, kernel: jax.Array, gy: jax.Array,
                    geo: geometry.ConvGeometry, mode: str, *,
                    precision=None) -> jax.Array:
  """Input gradient through the patch matrix (im2col, then col2im)."""
  p = geometry.extract_patches(x, geo)
  w = geometry.kernel_to_canonical(kernel, geo)
  gyc = geometry.output_to_canonical(gy, geo)
  dp = l1_input_grad(p, w, gyc, mode, precision=precision)
  return col2im(dp, geo, x.shape)


def conv_weight_grad(x: jax.Array, kernel: jax.Array, gy: jax.Array,
                     geo: geometry.ConvGeometry, mode: str, *,
                     precision=None) -> jax.Array:
  """Kernel gradient (flax layout) through the patch matrix."""
  p = geometry.extract_patches(x, geo)
  w = geometry.kernel_to_canonical(kernel, geo)
  gyc = geometry.output_to_canonical(gy, geo)
  return geometry.kernel_from_canonical(
      l1_weight_grad(p, w, gyc, mode, precision=precision), geo)
