"""The official AdderNet algorithm (unfold + broadcast), written in JAX.

The PyTorch reference implementation of the adder layer (huawei-noah/AdderNet)
works on unfolded patches: it turns the input into a column matrix
``X_col[C_in * k * k, N * H_out * W_out]`` (im2col), broadcasts it against the
filters ``W_col[C_out, C_in * k * k, 1]``, and reduces ``|X - W|`` over the
middle axis, materialising a ``C_out x C_in*k*k x N*H_out*W_out`` tensor. Its
backward pass is written the same way: the full-precision filter gradient
``sum_m (X - W) * g`` and the HardTanh input gradient
``sum_t clip(W - X, -1, 1) * g`` are broadcast products reduced over one axis,
and the column gradient is folded back onto the input (col2im).

This module re-implements that algorithm (not its code) as the baseline of the
benchmarks, so that the speed and memory of :func:`adderjax.adder_conv` can be
compared with it in one process. It is 2-D only (NHWC, HWIO), like the
official layer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def _out_size(size: int, k: int, stride: int, pad: int) -> int:
  return (size + 2 * pad - k) // stride + 1


def im2col(x: jax.Array, ksize: int, stride: int, pad: int) -> jax.Array:
  """NHWC input -> ``[C * k * k, N * H_out * W_out]`` (channel-major rows)."""
  n, h, w, c = x.shape
  ho, wo = _out_size(h, ksize, stride, pad), _out_size(w, ksize, stride, pad)
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  cols = []
  for i in range(ksize):
    for j in range(ksize):
      cols.append(lax.slice(
          xp, (0, i, j, 0),
          (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
          (1, stride, stride, 1)))
  cols = jnp.stack(cols, axis=0)             # [k*k, N, Ho, Wo, C]
  cols = cols.transpose(4, 0, 1, 2, 3)       # [C, k*k, N, Ho, Wo]
  return cols.reshape(c * ksize * ksize, n * ho * wo)


def kernel_to_rows(kernel: jax.Array) -> jax.Array:
  """HWIO kernel -> ``[C_out, C_in * k * k]`` in :func:`im2col`'s row order."""
  kh, kw, c_in, c_out = kernel.shape
  return kernel.transpose(3, 2, 0, 1).reshape(c_out, c_in * kh * kw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def adder_unfold(x: jax.Array, kernel: jax.Array, stride: int,
                 pad: int) -> jax.Array:
  """Adder layer by unfold + broadcast (NHWC in, NHWC out).

  Examples:
    >>> import jax.numpy as jnp
    >>> x = jnp.ones((1, 4, 4, 2)); k = jnp.zeros((3, 3, 2, 3))
    >>> y = adder_unfold(x, k, 1, 1)
    >>> y.shape, float(y[0, 1, 1, 0])  # 18 taps of |1 - 0|
    ((1, 4, 4, 3), -18.0)
  """
  return _fwd(x, kernel, stride, pad)[0]


def _fwd(x, kernel, stride, pad):
  n, h, w, _ = x.shape
  ksize, c_out = kernel.shape[0], kernel.shape[-1]
  x_col = im2col(x, ksize, stride, pad)                     # [K, M]
  w_col = kernel_to_rows(kernel)                            # [T, K]
  out = -jnp.sum(jnp.abs(w_col[:, :, None] - x_col[None, :, :]), axis=1)
  ho, wo = _out_size(h, ksize, stride, pad), _out_size(w, ksize, stride, pad)
  y = out.reshape(c_out, n, ho, wo).transpose(1, 2, 3, 0)
  return y, (x, kernel)


def _bwd(stride, pad, res, g):
  x, kernel = res
  ksize, c_out = kernel.shape[0], kernel.shape[-1]
  x_col = im2col(x, ksize, stride, pad)                     # [K, M]
  w_col = kernel_to_rows(kernel)                            # [T, K]
  g_col = g.transpose(3, 0, 1, 2).reshape(c_out, -1)        # [T, M]
  diff = x_col[None, :, :] - w_col[:, :, None]              # [T, K, M]
  grad_w_col = jnp.sum(diff * g_col[:, None, :], axis=2)    # [T, K]
  grad_x_col = jnp.sum(jnp.clip(-diff, -1.0, 1.0) * g_col[:, None, :],
                       axis=0)                              # [K, M]
  col2im = jax.linear_transpose(
      functools.partial(im2col, ksize=ksize, stride=stride, pad=pad), x)
  (grad_x,) = col2im(grad_x_col)
  kh, kw, c_in, _ = kernel.shape
  grad_k = grad_w_col.reshape(c_out, c_in, kh, kw).transpose(2, 3, 1, 0)
  return grad_x, grad_k


adder_unfold.defvjp(_fwd, _bwd)


def broadcast_bytes(x_shape, kernel_shape, stride: int, pad: int,
                    itemsize: int = 4) -> int:
  """Size of one ``[C_out, C_in*k*k, N*H_out*W_out]`` broadcast tensor."""
  n, h, w, _ = x_shape
  kh, kw, c_in, c_out = kernel_shape
  m = n * _out_size(h, kh, stride, pad) * _out_size(w, kw, stride, pad)
  return c_out * c_in * kh * kw * m * itemsize
