"""Flax NNX adder layers: drop-in replacements for ``nnx.Conv`` / ``nnx.Linear``.

Examples:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from adderjax.nnx import AdderConv
  >>> layer = AdderConv(3, 8, kernel_size=(3, 3), rngs=nnx.Rngs(0))
  >>> layer(jnp.ones((2, 16, 16, 3))).shape
  (2, 16, 16, 8)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from adderjax import _checks
from adderjax import _module_utils
from adderjax.ops.geometry import PaddingLike

Initializer = Any



def _check_rngs(rngs: Any, layer: str) -> None:
  """Refuses ``rngs`` that is not an :class:`flax.nnx.Rngs`."""
  if not isinstance(rngs, nnx.Rngs):
    raise _checks.ArgumentTypeError(
        f'`rngs` of {layer} must be a flax.nnx.Rngs (e.g. rngs=nnx.Rngs(0)), '
        f'got {_checks.describe(rngs)}.')

class AdderConv(nnx.Module):
  """Adder convolution (paper eq. 2), a drop-in for ``flax.nnx.Conv``.

  Follow it with ``nnx.BatchNorm(..., use_fast_variance=False)``: the outputs
  ``-sum |x - w|`` have a mean hundreds of standard deviations below zero late
  in training, where the one-pass ``E[y^2] - E[y]^2`` cancels in float32.

  Args:
    in_features: input features.
    out_features: output features.
    kernel_size: spatial kernel shape (an int for 1-D).
    strides: int or one per spatial dim.
    padding: ``'SAME'``, ``'VALID'``, ``'CIRCULAR'``, ``'REFLECT'``,
      ``'CAUSAL'`` (1-D), an int, or ``(lo, hi)`` pairs.
    input_dilation: must be 1 (kept for signature compatibility).
    kernel_dilation: int or one per spatial dim.
    feature_group_count: groups (``in_features`` for depthwise).
    use_bias: add a bias.
    dtype: computation dtype (``None``: promoted).
    param_dtype: parameter storage dtype.
    precision: matmul precision of the weight gradient.
    kernel_init: kernel initialiser (standard normal, as the official code).
    bias_init: bias initialiser (zeros).
    grad: ``'full_precision'`` (paper), ``'sign'`` or ``'unclipped'``.
    implementation: ``None``, ``'xla'`` or an accelerator backend.
    rngs: random streams (``params`` is used).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = AdderConv(2, 4, 3, use_bias=False, rngs=nnx.Rngs(0))
    >>> layer.kernel.shape
    (3, 2, 4)
  """

  def __init__(self,
               in_features: int,
               out_features: int,
               kernel_size: int | tuple[int, ...],
               strides: None | int | tuple[int, ...] = 1,
               *,
               padding: PaddingLike = 'SAME',
               input_dilation: None | int | tuple[int, ...] = 1,
               kernel_dilation: None | int | tuple[int, ...] = 1,
               feature_group_count: int = 1,
               use_bias: bool = True,
               dtype: Any = None,
               param_dtype: Any = jnp.float32,
               precision: Any = None,
               kernel_init: Initializer = _module_utils.standard_normal(),
               bias_init: Initializer = nnx.initializers.zeros_init(),
               grad: str = 'full_precision',
               implementation: str | None = None,
               rngs: nnx.Rngs):
    _check_rngs(rngs, type(self).__name__)
    _module_utils.check_layer_args(
        features={'in_features': in_features, 'out_features': out_features},
        grad=grad, precision=precision, implementation=implementation,
        feature_group_count=feature_group_count, kernel_size=kernel_size,
        strides=strides, padding=padding, kernel_dilation=kernel_dilation)
    kernel_size = _module_utils.kernel_size_tuple(kernel_size)
    if in_features % feature_group_count:
      raise ValueError(f'feature_group_count={feature_group_count} does not '
                       f'divide in_features={in_features}.')
    shape = kernel_size + (in_features // feature_group_count, out_features)
    self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
    self.bias = (nnx.Param(bias_init(rngs.params(), (out_features,),
                                     param_dtype))
                 if use_bias else nnx.data(None))
    self.in_features = in_features
    self.out_features = out_features
    self.kernel_size = kernel_size
    self.strides = strides
    self.padding = padding
    self.input_dilation = input_dilation
    self.kernel_dilation = kernel_dilation
    self.feature_group_count = feature_group_count
    self.use_bias = use_bias
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.grad = grad
    self.implementation = implementation

  def __call__(self, inputs: jax.Array) -> jax.Array:
    return _module_utils.apply_adder_conv(
        inputs, self.kernel[...],
        self.bias[...] if self.bias is not None else None,
        kernel_size=self.kernel_size, strides=self.strides,
        padding=self.padding, input_dilation=self.input_dilation,
        kernel_dilation=self.kernel_dilation,
        feature_group_count=self.feature_group_count, grad=self.grad,
        implementation=self.implementation, precision=self.precision,
        dtype=self.dtype)


class AdderDense(nnx.Module):
  """Fully connected adder layer, a drop-in for ``flax.nnx.Linear``.

  Args:
    in_features: input features.
    out_features: output features.
    use_bias: add a bias.
    dtype: computation dtype (``None``: promoted).
    param_dtype: parameter storage dtype.
    precision: matmul precision of the weight gradient.
    kernel_init: kernel initialiser (standard normal, as the official code).
    bias_init: bias initialiser (zeros).
    grad: ``'full_precision'`` (paper), ``'sign'`` or ``'unclipped'``.
    implementation: ``None``, ``'xla'`` or an accelerator backend.
    rngs: random streams (``params`` is used).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = AdderDense(5, 3, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 5))).shape
    (2, 3)
  """

  def __init__(self,
               in_features: int,
               out_features: int,
               *,
               use_bias: bool = True,
               dtype: Any = None,
               param_dtype: Any = jnp.float32,
               precision: Any = None,
               kernel_init: Initializer = _module_utils.standard_normal(),
               bias_init: Initializer = nnx.initializers.zeros_init(),
               grad: str = 'full_precision',
               implementation: str | None = None,
               rngs: nnx.Rngs):
    _check_rngs(rngs, type(self).__name__)
    _module_utils.check_layer_args(
        features={'in_features': in_features, 'out_features': out_features},
        grad=grad, precision=precision, implementation=implementation)
    self.kernel = nnx.Param(
        kernel_init(rngs.params(), (in_features, out_features), param_dtype))
    self.bias = (nnx.Param(bias_init(rngs.params(), (out_features,),
                                     param_dtype))
                 if use_bias else nnx.data(None))
    self.in_features = in_features
    self.out_features = out_features
    self.use_bias = use_bias
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.grad = grad
    self.implementation = implementation

  def __call__(self, inputs: jax.Array) -> jax.Array:
    return _module_utils.apply_adder_dense(
        inputs, self.kernel[...],
        self.bias[...] if self.bias is not None else None, grad=self.grad,
        implementation=self.implementation, precision=self.precision,
        dtype=self.dtype)
