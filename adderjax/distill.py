"""Kernel-based distillation between a CNN and an AdderNet (PKKD's maps).

Xu et al., "Kernel Based Progressive Distillation for Adder Neural Networks"
(NeurIPS 2020) distil a CNN of the same architecture into an AdderNet after
mapping both networks' features through kernels, so that the l1 features of
the adder layers and the inner products of the conv layers are compared in
one space:

* adder side, a Laplace kernel of the l1 distance the layer already
  computes: ``k_a(x, f) = exp(-||x - f||_1 / sigma_a) = exp(Y_a / sigma_a)``
  where ``Y_a = -||x - f||_1`` is the adder layer's output
  (:func:`laplace_kernel`);
* CNN side, a Gaussian kernel of the squared l2 distance
  ``k_c(x, f) = exp(-||x - f||^2 / (2 sigma_c^2))``, where
  ``||x - f||^2 = ||x||^2 - 2 x.f + ||f||^2`` is assembled from the conv
  output ``x.f``, the per-patch squared norms of the input (one
  convolution of ``x ** 2`` with a ones kernel: no patch is materialised)
  and the filters' squared norms (:func:`squared_distance_conv`,
  :func:`squared_distance_dense`, :func:`gaussian_kernel`).

The published text does not give the bandwidths; ``sigma=None`` chooses
them from the batch (the mean l1 distance for the Laplace kernel, the mean
squared distance for ``2 sigma_c^2``, both without gradient), so that both
maps have values of the same size, ``exp(-1)`` at a typical distance, on
every layer. :func:`feature_loss` and :func:`kd_loss` are the distillation
losses (a mean squared error between mapped features, and the temperature
softened output KL divergence).

All functions are pure (``jax.numpy`` in, ``jax.numpy`` out); they work on
Linen and NNX models alike, on whatever features the caller collects
(:func:`adderjax.introspect.intercept_layers` records a layer's input and
output).

Examples:
  >>> import jax.numpy as jnp
  >>> from adderjax import distill
  >>> x = jnp.array([[0., 1.], [2., 2.]])          # two inputs
  >>> w = jnp.array([[1., 0.], [1., 1.]]).T        # two filters (columns)
  >>> d2 = distill.squared_distance_dense(x, w, x @ w)
  >>> d2.tolist()                                  # ||x_i - w_j||^2
  [[2.0, 1.0], [5.0, 2.0]]
  >>> k = distill.gaussian_kernel(d2, sigma=1.0)
  >>> [[round(float(v), 3) for v in row] for row in k]
  [[0.368, 0.607], [0.082, 0.368]]
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adderjax import _checks

__all__ = ['patch_squared_norms', 'squared_distance_conv',
           'squared_distance_dense', 'laplace_kernel', 'gaussian_kernel',
           'feature_loss', 'kd_loss']


def _bandwidth(name: str, value):
  """``None``, or a finite number > 0 (a traced value passes unchecked)."""
  if value is None:
    return None
  return _checks.finite_number(name, value, low=0, low_open=True)


def _spatial(name: str, value, n: int) -> tuple[int, ...]:
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    value = (int(value),) * n
  value = tuple(value)
  if len(value) != n or not all(
      isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1
      for v in value):
    raise ValueError(f'{name} must be {n} int(s) >= 1, got {value!r}.')
  return tuple(int(v) for v in value)


def patch_squared_norms(x: jax.Array, kernel_size: Sequence[int], *,
                        strides: int | Sequence[int] = 1,
                        padding: str | Sequence[tuple[int, int]] = 'VALID',
                        input_dilation: int | Sequence[int] = 1,
                        kernel_dilation: int | Sequence[int] = 1,
                        feature_group_count: int = 1) -> jax.Array:
  """``||x_p||^2`` of every input patch a convolution sees, per group.

  One convolution of ``x ** 2`` with a ones kernel of the layer's geometry:
  the patches are never materialised.

  Args:
    x: ``(N, *spatial, C)`` input (channels last).
    kernel_size: the spatial kernel shape.
    strides: the layer's strides.
    padding: ``'SAME'``, ``'VALID'`` or explicit ``(lo, hi)`` pairs (zero
      padding, as :func:`jax.lax.conv_general_dilated`).
    input_dilation: the layer's input (lhs) dilation.
    kernel_dilation: the layer's kernel (rhs) dilation.
    feature_group_count: the layer's feature groups ``G``.

  Returns:
    ``(N, *out_spatial, G)``: the squared norm of each patch of each group
    of input channels.

  Raises:
    ValueError: a bad shape, geometry or group count (named).

  Examples:
    >>> import jax.numpy as jnp
    >>> x = jnp.arange(4.).reshape(1, 4, 1)          # 1-D, one channel
    >>> patch_squared_norms(x, (2,))[0, :, 0].tolist()  # 0+1, 1+4, 4+9
    [1.0, 5.0, 13.0]
  """
  x = jnp.asarray(x)
  n = len(tuple(kernel_size))
  if x.ndim != n + 2:
    raise ValueError(f'x must have shape (N, *spatial, C) with {n} spatial '
                     f'dims for kernel_size {tuple(kernel_size)}, got shape '
                     f'{x.shape}.')
  kernel_size = _spatial('kernel_size', kernel_size, n)
  strides = _spatial('strides', strides, n)
  input_dilation = _spatial('input_dilation', input_dilation, n)
  kernel_dilation = _spatial('kernel_dilation', kernel_dilation, n)
  g = _checks.positive_int('feature_group_count', feature_group_count)
  c = x.shape[-1]
  if c % g:
    raise ValueError(f'feature_group_count {g} does not divide the input\'s '
                     f'{c} channels.')
  if isinstance(padding, str):
    if padding.upper() not in ('SAME', 'VALID'):
      raise ValueError(f"padding {padding!r}: use 'SAME', 'VALID' or "
                       '(lo, hi) pairs (zero padding).')
    padding = padding.upper()
  else:
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if len(padding) != n:
      raise ValueError(f'padding must have {n} (lo, hi) pairs, got '
                       f'{padding!r}.')
  sq = jnp.square(x.astype(jnp.float32))
  ones = jnp.ones(kernel_size + (c // g, g), jnp.float32)
  spec = ''.join('DHW'[-n:]) if n <= 3 else None
  if spec is None:
    raise ValueError(f'kernel_size {kernel_size}: 1 to 3 spatial dims.')
  dims = jax.lax.conv_dimension_numbers(
      sq.shape, ones.shape, (f'N{spec}C', f'{spec}IO', f'N{spec}C'))
  return jax.lax.conv_general_dilated(
      sq, ones, window_strides=strides, padding=padding,
      lhs_dilation=input_dilation, rhs_dilation=kernel_dilation,
      dimension_numbers=dims, feature_group_count=g,
      precision=jax.lax.Precision.HIGHEST)


def squared_distance_conv(x: jax.Array, kernel: jax.Array,
                          conv_out: jax.Array, *,
                          strides: int | Sequence[int] = 1,
                          padding: str | Sequence[tuple[int, int]] = 'VALID',
                          input_dilation: int | Sequence[int] = 1,
                          kernel_dilation: int | Sequence[int] = 1,
                          feature_group_count: int = 1) -> jax.Array:
  """``||x_p - f_c||^2`` of a convolution from its output and two norms.

  ``||x_p||^2 - 2 x_p . f_c + ||f_c||^2`` with ``x_p . f_c`` the layer's
  output without bias (``conv_out``), the patch norms of
  :func:`patch_squared_norms` and the filters' squared norms; clamped at 0
  (the expansion may round slightly below).

  Args:
    x: ``(N, *spatial, C_in)`` the layer's input.
    kernel: ``(*kernel_size, C_in / G, C_out)`` the layer's kernel.
    conv_out: ``(N, *out_spatial, C_out)`` the convolution of ``x`` with
      ``kernel`` (no bias).
    strides, padding, input_dilation, kernel_dilation, feature_group_count:
      the layer's geometry (see :func:`patch_squared_norms`).

  Returns:
    ``(N, *out_spatial, C_out)`` squared l2 distances (float32).

  Raises:
    ValueError: shapes that do not belong together (named).

  Examples:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[[1.], [2.], [4.]]])          # (1, 3, 1)
    >>> f = jnp.array([[[1.]], [[1.]]])              # (2, 1, 1)
    >>> y = jnp.array([[[3.], [6.]]])                # x . f per patch
    >>> squared_distance_conv(x, f, y)[0, :, 0].tolist()  # 0+1, 1+9
    [1.0, 10.0]
  """
  x, kernel, conv_out = (jnp.asarray(a) for a in (x, kernel, conv_out))
  n = kernel.ndim - 2
  if n < 1 or x.ndim != n + 2 or conv_out.ndim != n + 2:
    raise ValueError(f'x {x.shape}, kernel {kernel.shape} and conv_out '
                     f'{conv_out.shape} must be (N, *spatial, C), '
                     '(*kernel_size, C_in/G, C_out) and (N, *out, C_out).')
  g = _checks.positive_int('feature_group_count', feature_group_count)
  c_out = kernel.shape[-1]
  if conv_out.shape[-1] != c_out or c_out % g:
    raise ValueError(f'conv_out has {conv_out.shape[-1]} channels and the '
                     f'kernel {c_out} outputs in {g} groups: they must match.')
  if x.shape[-1] != kernel.shape[-2] * g:
    raise ValueError(f'x has {x.shape[-1]} channels; the kernel {kernel.shape}'
                     f' with {g} groups takes {kernel.shape[-2] * g}.')
  patch = patch_squared_norms(
      x, kernel.shape[:n], strides=strides, padding=padding,
      input_dilation=input_dilation, kernel_dilation=kernel_dilation,
      feature_group_count=g)
  if patch.shape[:-1] != conv_out.shape[:-1]:
    raise ValueError(f'conv_out {conv_out.shape} does not have the output '
                     f'shape {patch.shape[:-1]} of this geometry.')
  patch = jnp.repeat(patch, c_out // g, axis=-1)
  filt = jnp.sum(jnp.square(kernel.astype(jnp.float32)),
                 axis=tuple(range(n + 1)))
  d2 = patch - 2.0 * conv_out.astype(jnp.float32) + filt
  return jnp.maximum(d2, 0.0)


def squared_distance_dense(x: jax.Array, kernel: jax.Array,
                           dense_out: jax.Array) -> jax.Array:
  """``||x_i - w_j||^2`` of a dense layer from its output and two norms.

  Args:
    x: ``(..., K)`` the layer's input.
    kernel: ``(K, M)`` the layer's kernel (column ``j`` is filter ``w_j``).
    dense_out: ``(..., M)`` ``x @ kernel`` (no bias).

  Returns:
    ``(..., M)`` squared l2 distances (float32), clamped at 0.

  Raises:
    ValueError: shapes that do not belong together (named).

  Examples:
    >>> import jax.numpy as jnp
    >>> squared_distance_dense(jnp.array([[3., 4.]]), jnp.zeros((2, 1)),
    ...                        jnp.zeros((1, 1))).tolist()
    [[25.0]]
  """
  x, kernel, dense_out = (jnp.asarray(a) for a in (x, kernel, dense_out))
  if kernel.ndim != 2 or x.shape[-1:] != kernel.shape[:1] or (
      dense_out.shape != x.shape[:-1] + kernel.shape[1:]):
    raise ValueError(f'x {x.shape}, kernel {kernel.shape} and dense_out '
                     f'{dense_out.shape} must be (..., K), (K, M), (..., M).')
  xs = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
  ws = jnp.sum(jnp.square(kernel.astype(jnp.float32)), axis=0)
  return jnp.maximum(xs - 2.0 * dense_out.astype(jnp.float32) + ws, 0.0)


def laplace_kernel(adder_out: jax.Array, sigma=None) -> jax.Array:
  """``exp(-||x - f||_1 / sigma) = exp(Y_a / sigma)`` from an adder output.

  Args:
    adder_out: an adder layer's output ``Y_a = -||x - f||_1`` (<= 0).
    sigma: the bandwidth; ``None``: the batch's mean l1 distance
      ``mean(-Y_a)``, without gradient (a typical distance maps to
      ``exp(-1)``).

  Returns:
    The kernel values in ``(0, 1]`` (float32).

  Raises:
    ValueError: ``sigma`` not a finite number > 0.

  Examples:
    >>> import jax.numpy as jnp
    >>> k = laplace_kernel(jnp.array([0., -2.]), sigma=2.)
    >>> [round(float(v), 4) for v in k]
    [1.0, 0.3679]
    >>> k = laplace_kernel(jnp.array([-1., -3.]))  # sigma: mean distance 2
    >>> [round(float(v), 4) for v in k]
    [0.6065, 0.2231]
  """
  sigma = _bandwidth('sigma', sigma)
  y = jnp.asarray(adder_out).astype(jnp.float32)
  if sigma is None:
    sigma = jax.lax.stop_gradient(jnp.maximum(jnp.mean(-y), 1e-12))
  return jnp.exp(y / sigma)


def gaussian_kernel(squared_distance: jax.Array, sigma=None) -> jax.Array:
  """``exp(-d^2 / (2 sigma^2))`` of squared l2 distances.

  Args:
    squared_distance: ``||x - f||^2`` (e.g. :func:`squared_distance_conv`).
    sigma: the bandwidth; ``None``: ``2 sigma^2`` is the batch's mean
      squared distance, without gradient (a typical distance maps to
      ``exp(-1)``).

  Returns:
    The kernel values in ``(0, 1]`` (float32).

  Raises:
    ValueError: ``sigma`` not a finite number > 0.

  Examples:
    >>> import jax.numpy as jnp
    >>> k = gaussian_kernel(jnp.array([0., 2.]), sigma=1.)
    >>> [round(float(v), 4) for v in k]
    [1.0, 0.3679]
  """
  sigma = _bandwidth('sigma', sigma)
  d2 = jnp.asarray(squared_distance).astype(jnp.float32)
  if sigma is None:
    two_var = jax.lax.stop_gradient(jnp.maximum(jnp.mean(d2), 1e-12))
  else:
    two_var = 2.0 * jnp.square(sigma)
  return jnp.exp(-d2 / two_var)


def feature_loss(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """Mean squared difference of two feature maps (the teacher's held fixed).

  Args:
    student: the student's (mapped) features.
    teacher: the teacher's (mapped) features, of the same shape; no
      gradient flows into them.

  Raises:
    ValueError: different shapes.

  Examples:
    >>> import jax.numpy as jnp
    >>> float(feature_loss(jnp.array([1., 3.]), jnp.array([0., 1.])))
    2.5
  """
  student, teacher = jnp.asarray(student), jnp.asarray(teacher)
  if student.shape != teacher.shape:
    raise ValueError(f'student features {student.shape} and teacher features '
                     f'{teacher.shape} must have the same shape.')
  diff = (student.astype(jnp.float32) -
          jax.lax.stop_gradient(teacher.astype(jnp.float32)))
  return jnp.mean(jnp.square(diff))


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array,
            temperature: float = 1.0) -> jax.Array:
  """``T^2 KL(softmax(t / T) || softmax(s / T))``, batch mean.

  Hinton et al.'s soft-target loss; ``T^2`` keeps its gradient's size
  independent of the temperature. No gradient flows into the teacher.

  Args:
    student_logits: ``(batch, classes)``.
    teacher_logits: ``(batch, classes)``.
    temperature: ``T > 0``.

  Raises:
    ValueError: different shapes or a bad temperature.

  Examples:
    >>> import jax.numpy as jnp
    >>> float(kd_loss(jnp.array([[1., 2.]]), jnp.array([[1., 2.]])))
    0.0
  """
  temperature = _checks.finite_number('temperature', temperature, low=0,
                                      low_open=True)
  s = jnp.asarray(student_logits).astype(jnp.float32)
  t = jax.lax.stop_gradient(jnp.asarray(teacher_logits).astype(jnp.float32))
  if s.shape != t.shape or s.ndim != 2:
    raise ValueError(f'student_logits {s.shape} and teacher_logits {t.shape} '
                     'must both be (batch, classes).')
  log_p = jax.nn.log_softmax(t / temperature)
  log_q = jax.nn.log_softmax(s / temperature)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  return jnp.square(temperature) * jnp.mean(kl)
