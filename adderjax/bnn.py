"""Binary layers for the paper's BNN baselines (Tables 1 and 2), in flax.linen.

The paper compares every AdderNet with a binary neural network (BNN) of the
same topology, trained DoReFa-Net style. :class:`BinaryConv` and
:class:`BinaryDense` are drop-ins for ``nn.Conv`` / ``nn.Dense`` (same
parameter names ``kernel`` / ``bias``, shapes and padding semantics) that
binarise both operands before the product, simulated in floating point:

* **Weights** (:func:`binarize_kernel`): ``W_b = alpha * sgn(W)`` with
  ``sgn(0) = +1`` and a scale ``alpha = mean(|W|)`` per output channel
  (``weight_scale='channel'``, XNOR-Net), per layer (``'layer'``, DoReFa-Net)
  or ``1`` (``'none'``). Backward: the straight-through estimator (STE)
  ``dL/dW = dL/dW_b`` (DoReFa-Net's identity STE; ``alpha`` is part of the
  quantiser, not differentiated separately).
* **Activations** (:func:`binarize_activations`), applied to the layer input:
  ``'sign'``: ``x_b = sgn(x)`` in ``{-1, +1}`` with the clipped STE
  ``dL/dx = dL/dx_b * 1[|x| <= 1]`` (BNN / XNOR-Net);
  ``'dorefa'``: DoReFa-Net's 1-bit quantiser ``x_b = round(clip(x, 0, 1))``
  in ``{0, 1}`` (``x >= 0.5`` maps to 1) with ``dL/dx = dL/dx_b * 1[0 <= x <= 1]``;
  ``'none'``: the input is left in full precision (a binary-weight network).

On binary hardware the dot product of ``{-1, +1}`` vectors is an XNOR and a
popcount (``{0, 1}`` inputs: an AND and a popcount), one bit operation and one
integer add per tap: that is how :func:`adderjax.count_ops` counts these layers.
The per-channel scale folds into the BatchNorm that follows in every model of
the zoo, so it costs no multiplication at inference. Zero padding pads the
binarised input with zeros (a ternary border), as float-simulated BNNs do.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from adderjax.bnn import BinaryConv
  >>> layer = BinaryConv(features=4, kernel_size=(3, 3), use_bias=False)
  >>> x = jnp.full((1, 6, 6, 2), 0.3)
  >>> kernel = jnp.full((3, 3, 2, 4), -0.5)
  >>> y = layer.apply({'params': {'kernel': kernel}}, x)
  >>> y.shape, float(y[0, 2, 2, 0])  # 18 taps of (+1) * (-1) * mean|W|
  ((1, 6, 6, 4), -9.0)

References:
  Zhou et al., "DoReFa-Net: Training Low Bitwidth Convolutional Neural
  Networks with Low Bitwidth Gradients", 2016. https://arxiv.org/abs/1606.06160
  Rastegari et al., "XNOR-Net: ImageNet Classification Using Binary
  Convolutional Neural Networks", ECCV 2016. https://arxiv.org/abs/1603.05279
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
from flax.linen import dtypes
from flax.linen.linear import canonicalize_padding
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from adderjax import _module_utils
from adderjax.ops.geometry import PaddingLike

#: Input binarisation modes of :class:`BinaryConv` / :class:`BinaryDense`.
ACTIVATION_MODES = ('sign', 'dorefa', 'none')
#: Kernel scale modes of :func:`binarize_kernel`.
WEIGHT_SCALES = ('channel', 'layer', 'none')

Initializer = Any


def _check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f'{name} must be one of {choices}, got {value!r}.')


# ---------------------------------------------------------------------------
# Activation quantisers with straight-through estimators.
# ---------------------------------------------------------------------------


@jax.custom_vjp
def _sign_ste(x):
  return jnp.where(x >= 0, 1, -1).astype(x.dtype)


def _sign_ste_fwd(x):
  return _sign_ste(x), x


def _sign_ste_bwd(x, g):
  return (jnp.where(jnp.abs(x) <= 1, g, jnp.zeros_like(g)),)


_sign_ste.defvjp(_sign_ste_fwd, _sign_ste_bwd)


@jax.custom_vjp
def _dorefa_ste(x):
  return jnp.where(x >= 0.5, 1, 0).astype(x.dtype)


def _dorefa_ste_fwd(x):
  return _dorefa_ste(x), x


def _dorefa_ste_bwd(x, g):
  inside = (x >= 0) & (x <= 1)
  return (jnp.where(inside, g, jnp.zeros_like(g)),)


_dorefa_ste.defvjp(_dorefa_ste_fwd, _dorefa_ste_bwd)


def binarize_activations(x: jax.Array, mode: str = 'sign') -> jax.Array:
  """Binarises activations with a straight-through estimator.

  Args:
    x: a floating array.
    mode: ``'sign'`` (``{-1, +1}``, ``sgn(0) = +1``, gradient passed where
      ``|x| <= 1``), ``'dorefa'`` (``{0, 1}``, 1 where ``x >= 0.5``, gradient
      passed where ``0 <= x <= 1``) or ``'none'`` (identity).

  Returns:
    An array of the shape and dtype of ``x``.

  Raises:
    ValueError: an unknown ``mode``.
    TypeError: a non-floating ``x``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> x = jnp.array([-2., -0.5, 0., 0.7, 3.])
    >>> binarize_activations(x, 'sign').tolist()
    [-1.0, -1.0, 1.0, 1.0, 1.0]
    >>> jax.grad(lambda v: binarize_activations(v, 'sign').sum())(x).tolist()
    [0.0, 1.0, 1.0, 1.0, 0.0]
    >>> binarize_activations(x, 'dorefa').tolist()
    [0.0, 0.0, 0.0, 1.0, 1.0]
  """
  _check_choice('mode', mode, ACTIVATION_MODES)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f'binarize_activations needs a floating input, got '
                    f'{x.dtype}.')
  if mode == 'sign':
    return _sign_ste(x)
  if mode == 'dorefa':
    return _dorefa_ste(x)
  return x


# ---------------------------------------------------------------------------
# Kernel binarisation.
# ---------------------------------------------------------------------------


def kernel_scale(kernel: jax.Array, scale: str = 'channel') -> jax.Array:
  """The scale ``alpha`` of :func:`binarize_kernel`, broadcastable to kernel.

  Args:
    kernel: a kernel whose last axis is the output channel.
    scale: ``'channel'``, ``'layer'`` or ``'none'``.

  Returns:
    ``mean(|kernel|)`` over all axes but the last (``'channel'``, shape
    ``(1, ..., 1, C_out)``), over all axes (``'layer'``) or ones.

  Examples:
    >>> import jax.numpy as jnp
    >>> kernel_scale(jnp.array([[1., -4.], [-3., 0.]])).tolist()
    [[2.0, 2.0]]
  """
  _check_choice('scale', scale, WEIGHT_SCALES)
  kernel = jnp.asarray(kernel)
  if scale == 'channel':
    axes = tuple(range(kernel.ndim - 1))
    return jnp.mean(jnp.abs(kernel), axis=axes, keepdims=True)
  if scale == 'layer':
    return jnp.mean(jnp.abs(kernel), keepdims=True)
  return jnp.ones((1,) * kernel.ndim, kernel.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _binarize_kernel(kernel, scale):
  alpha = kernel_scale(kernel, scale)
  return (jnp.where(kernel >= 0, 1, -1).astype(kernel.dtype)
          * alpha.astype(kernel.dtype))


def _binarize_kernel_fwd(kernel, scale):
  return _binarize_kernel(kernel, scale), None


def _binarize_kernel_bwd(scale, res, g):  # pylint: disable=unused-argument
  return (g,)


_binarize_kernel.defvjp(_binarize_kernel_fwd, _binarize_kernel_bwd)


def binarize_kernel(kernel: jax.Array, scale: str = 'channel') -> jax.Array:
  """``alpha * sgn(kernel)`` forward, identity (straight-through) backward.

  Args:
    kernel: a floating kernel whose last axis is the output channel
      (``nn.Conv``: ``(*window, C_in // groups, C_out)``; ``nn.Dense``:
      ``(C_in, C_out)``).
    scale: ``'channel'`` (XNOR-Net: one ``mean|W|`` per output channel),
      ``'layer'`` (DoReFa-Net: one for the layer) or ``'none'``.

  Returns:
    The binarised kernel, same shape and dtype.

  Raises:
    ValueError: an unknown ``scale``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> w = jnp.array([[0.5, -2.], [-1.5, 0.]])
    >>> binarize_kernel(w).tolist()   # per column: mean |w| = 1.0 and 1.0
    [[1.0, -1.0], [-1.0, 1.0]]
    >>> jax.grad(lambda v: (binarize_kernel(v) * 3.).sum())(w).tolist()
    [[3.0, 3.0], [3.0, 3.0]]
  """
  _check_choice('scale', scale, WEIGHT_SCALES)
  kernel = jnp.asarray(kernel)
  if not jnp.issubdtype(kernel.dtype, jnp.floating):
    raise TypeError(f'binarize_kernel needs a floating kernel, got '
                    f'{kernel.dtype}.')
  return _binarize_kernel(kernel, scale)


# ---------------------------------------------------------------------------
# Modules.
# ---------------------------------------------------------------------------


def _broadcast(value, n: int, name: str) -> tuple[int, ...]:
  if value is None:
    value = 1
  if isinstance(value, (int, np.integer)):
    return (int(value),) * n
  value = tuple(int(v) for v in value)
  if len(value) != n:
    raise ValueError(f'{name} must be an int or have {n} entries, got '
                     f'{value!r}.')
  return value


class BinaryConv(nn.Module):
  """Binary convolution (weights and inputs binarised), drop-in for ``nn.Conv``.

  ``y = conv(binarize_activations(x), binarize_kernel(kernel)) + bias``.
  Same fields, defaults and parameters as ``nn.Conv`` (``input_dilation``
  must be 1), plus the binarisation modes.

  Attributes:
    features: number of output features.
    kernel_size: spatial kernel shape (an int for 1-D).
    strides: int or one per spatial dim.
    padding: ``'SAME'``, ``'VALID'``, ``'CIRCULAR'``, ``'REFLECT'``,
      ``'CAUSAL'`` (1-D), an int, ints or ``(lo, hi)`` pairs.
    input_dilation: must be 1.
    kernel_dilation: int or one per spatial dim.
    feature_group_count: groups.
    use_bias: add a bias.
    dtype: computation dtype (``None``: promoted from inputs and params).
    param_dtype: parameter dtype.
    precision: ``lax`` precision of the convolution.
    kernel_init: initialiser of the latent (full-precision) kernel.
    bias_init: bias initialiser.
    input_binarization: ``'sign'``, ``'dorefa'`` or ``'none'`` (see
      :func:`binarize_activations`).
    weight_scale: ``'channel'``, ``'layer'`` or ``'none'`` (see
      :func:`binarize_kernel`).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> layer = BinaryConv(features=2, kernel_size=(1, 1), use_bias=False)
    >>> x = jnp.array([[[[0.3, -2.0]]]])
    >>> params = {'params': {'kernel': jnp.array([[[[1., -3.], [-1., 1.]]]])}}
    >>> # x_b = (+1, -1); W_b = (1 * (+1, -1), 2 * (-1, +1)) per output channel
    >>> layer.apply(params, x).tolist()
    [[[[2.0, -4.0]]]]
  """
  features: int
  kernel_size: int | tuple[int, ...]
  strides: None | int | tuple[int, ...] = 1
  padding: PaddingLike = 'SAME'
  input_dilation: None | int | tuple[int, ...] = 1
  kernel_dilation: None | int | tuple[int, ...] = 1
  feature_group_count: int = 1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  input_binarization: str = 'sign'
  weight_scale: str = 'channel'

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    _check_choice('input_binarization', self.input_binarization,
                  ACTIVATION_MODES)
    _check_choice('weight_scale', self.weight_scale, WEIGHT_SCALES)
    kernel_size = _module_utils.kernel_size_tuple(self.kernel_size)
    nsp = len(kernel_size)
    if any(d != 1 for d in _broadcast(self.input_dilation, nsp,
                                      'input_dilation')):
      raise ValueError(f'input_dilation={self.input_dilation!r} is not '
                       'supported by BinaryConv (only 1).')
    strides = _broadcast(self.strides, nsp, 'strides')
    dilation = _broadcast(self.kernel_dilation, nsp, 'kernel_dilation')
    inputs = jnp.asarray(inputs)
    if inputs.ndim < nsp + 1:
      raise ValueError(f'input of shape {inputs.shape} has too few dims for a '
                       f'{nsp}-D convolution (need spatial dims and features).')
    num_batch = inputs.ndim - (nsp + 1)
    batch_shape = inputs.shape[:num_batch]
    if num_batch != 1:
      inputs = inputs.reshape((-1,) + inputs.shape[num_batch:])
    in_features = inputs.shape[-1]
    if in_features % self.feature_group_count:
      raise ValueError(f'feature_group_count={self.feature_group_count} does '
                       f'not divide the input features {in_features}.')
    kernel = self.param(
        'kernel', self.kernel_init,
        kernel_size + (in_features // self.feature_group_count,
                       self.features), self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    inputs, kernel, bias = dtypes.promote_dtype(inputs, kernel, bias,
                                                dtype=self.dtype)
    xb = binarize_activations(inputs, self.input_binarization)
    wb = binarize_kernel(kernel, self.weight_scale)

    pad = canonicalize_padding(self.padding, nsp)
    if pad in ('CIRCULAR', 'REFLECT'):
      dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
      widths = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
      xb = jnp.pad(xb, widths,
                   mode={'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}[pad])
      pad = 'VALID'
    elif pad == 'CAUSAL':
      if nsp != 1:
        raise ValueError("padding='CAUSAL' is only defined for 1-D "
                         f'convolutions, got kernel_size={kernel_size}.')
      xb = jnp.pad(xb, [(0, 0), (dilation[0] * (kernel_size[0] - 1), 0),
                        (0, 0)])
      pad = 'VALID'
    spatial = ''.join('DHW'[3 - nsp:])  # 'W', 'HW' or 'DHW'
    dn = lax.conv_dimension_numbers(
        xb.shape, wb.shape,
        ('N' + spatial + 'C', spatial + 'IO', 'N' + spatial + 'C'))
    y = lax.conv_general_dilated(
        xb, wb, strides, pad, rhs_dilation=dilation, dimension_numbers=dn,
        feature_group_count=self.feature_group_count,
        precision=self.precision)
    if bias is not None:
      y = y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)
    if num_batch != 1:
      y = y.reshape(batch_shape + y.shape[1:])
    return y


class BinaryDense(nn.Module):
  """Binary fully connected layer, a drop-in for ``nn.Dense``.

  ``y = binarize_activations(x) @ binarize_kernel(kernel) + bias``.

  Attributes:
    features: number of output features.
    use_bias: add a bias.
    dtype: computation dtype (``None``: promoted).
    param_dtype: parameter dtype.
    precision: ``lax`` precision of the product.
    kernel_init: initialiser of the latent kernel.
    bias_init: bias initialiser.
    input_binarization: ``'sign'``, ``'dorefa'`` or ``'none'``.
    weight_scale: ``'channel'``, ``'layer'`` or ``'none'``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> layer = BinaryDense(features=3)
    >>> variables = jax.eval_shape(layer.init, jax.random.key(0),
    ...                            jnp.ones((2, 5)))
    >>> jax.tree.map(jnp.shape, variables['params'])
    {'bias': (3,), 'kernel': (5, 3)}
    >>> kernel = jnp.array([[1.], [-1.], [2.], [0.]])  # mean |W| = 1
    >>> layer = BinaryDense(features=1, use_bias=False)
    >>> # sgn(x) = (+, -, -, +), sgn(W) = (+, -, +, +): 1 + 1 - 1 + 1
    >>> layer.apply({'params': {'kernel': kernel}},
    ...             jnp.array([[0.5, -0.5, -1., 3.]])).tolist()
    [[2.0]]
  """
  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  input_binarization: str = 'sign'
  weight_scale: str = 'channel'

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    _check_choice('input_binarization', self.input_binarization,
                  ACTIVATION_MODES)
    _check_choice('weight_scale', self.weight_scale, WEIGHT_SCALES)
    inputs = jnp.asarray(inputs)
    if inputs.ndim < 1:
      raise ValueError('BinaryDense needs an input with a feature axis, got a '
                       'scalar.')
    kernel = self.param('kernel', self.kernel_init,
                        (inputs.shape[-1], self.features), self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    inputs, kernel, bias = dtypes.promote_dtype(inputs, kernel, bias,
                                                dtype=self.dtype)
    xb = binarize_activations(inputs, self.input_binarization)
    wb = binarize_kernel(kernel, self.weight_scale)
    y = lax.dot_general(xb, wb, (((xb.ndim - 1,), (0,)), ((), ())),
                        precision=self.precision)
    if bias is not None:
      y = y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)
    return y
