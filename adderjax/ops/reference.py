"""Pure-JAX (XLA) adder kernels on the canonical patch layout.

This is the ``'xla'`` backend, available on every platform, and the fallback
of ``implementation=None``. All functions take the canonical layout of
:mod:`adderjax.ops.geometry`: patches ``P[G, K, M]``, kernel ``W[G, K, T]``,
output / output cotangent ``[G, T, M]``.

Design (see DESIGN.md section 2):

* Forward. ``-sum_k |p - w| = sum_k p + sum_k w - 2 sum_k max(p, w)``: the two
  plain sums are cheap reductions, and the inner loop is ``max`` + ``add`` (2
  vector ops) instead of ``sub`` + ``abs`` + ``add`` (3). The loop runs over
  ``K`` in chunks of ``unroll`` taps; each chunk is one fused XLA loop whose
  ``[G, T, M]`` accumulator stays in registers for ``unroll`` steps, so the
  accumulator makes one round trip to memory per chunk, not per tap. The
  ``[G, K, T, M]`` tensor of the official code is never built.
* Weight gradient, full-precision modes: ``dW = P g^T - W * sum_m g``: one
  batched matmul (the conv weight gradient) plus a rank-1 correction.
* Input gradient: ``dP[k, m] = sum_t g[t, m] h(W[k, t] - P[k, m])`` with ``h``
  HardTanh, sign or identity. The identity (``'unclipped'``) is again a matmul;
  the other two loop over ``T`` in fused chunks with an f32 ``[G, K, M]``
  accumulator.
* Everything accumulates in float32 (float64 for float64 inputs) and casts
  back at the end.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

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
  u = min(unroll, k)
  pp = _pad_axis(p, 1, u)  # zero taps add max(0, 0) = 0
  wp = _pad_axis(w, 1, u)

  def chunk(start, acc):
    pc = lax.dynamic_slice_in_dim(pp, start, u, axis=1).astype(dt)
    wc = lax.dynamic_slice_in_dim(wp, start, u, axis=1).astype(dt)
    for j in range(u):
      acc = acc + jnp.maximum(pc[:, j, None, :], wc[:, j, :, None])
    return acc

  acc = _chunked_loop(k, u, chunk, jnp.zeros((g, t, m), dt))
  sum_p = jnp.sum(p.astype(dt), axis=1)  # [G, M]
  sum_w = jnp.sum(w.astype(dt), axis=1)  # [G, T]
  return sum_p[:, None, :] + sum_w[:, :, None] - 2.0 * acc


def _h(mode: str, d: jax.Array) -> jax.Array:
  if mode == 'full_precision':
    return jnp.clip(d, -1.0, 1.0)
  if mode == 'sign':
    return jnp.sign(d)
  return d


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
    wg = jnp.einsum('gkt,gtm->gkm', w.astype(dt), gy, precision=precision,
                    preferred_element_type=dt)
    return wg - p.astype(dt) * jnp.sum(gy, axis=1)[:, None, :]
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
  as a matmul plus a rank-1 term, and ``sign`` for ``'sign'`` (eq. 3).

  Returns:
    ``[G, K, T]`` float32.
  """
  dt = acc_dtype(p, w, gy)
  gy = gy.astype(dt)
  if mode != 'sign':
    pg = jnp.einsum('gkm,gtm->gkt', p.astype(dt), gy, precision=precision,
                    preferred_element_type=dt)
    return pg - w.astype(dt) * jnp.sum(gy, axis=2)[:, None, :]
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
