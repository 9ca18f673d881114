"""Flax Linen adder layers: drop-in replacements for ``nn.Conv`` / ``nn.Dense``.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from adderjax.linen import AdderConv
  >>> layer = AdderConv(features=8, kernel_size=(3, 3))
  >>> x = jnp.ones((2, 16, 16, 3))
  >>> variables = layer.init(jax.random.key(0), x)
  >>> variables['params']['kernel'].shape
  (3, 3, 3, 8)
  >>> layer.apply(variables, x).shape
  (2, 16, 16, 8)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from adderjax import _module_utils
from adderjax.ops.geometry import PaddingLike

Initializer = Any


class AdderConv(nn.Module):
  """Adder convolution (paper eq. 2), a drop-in for ``flax.linen.Conv``.

  Same arguments, defaults, parameter names (``kernel``, ``bias``) and shapes as
  ``nn.Conv``; the kernel is initialised standard normal as in the official
  code. Inputs are feature-last with any number of leading batch dims.

  Follow it with BatchNorm using ``use_fast_variance=False``: the outputs
  ``-sum |x - w|`` have a mean hundreds of standard deviations below zero late
  in training, where the one-pass ``E[y^2] - E[y]^2`` cancels in float32.

  Attributes:
    features: number of output features.
    kernel_size: spatial kernel shape (an int for 1-D).
    strides: int or one per spatial dim.
    padding: ``'SAME'``, ``'VALID'``, ``'CIRCULAR'``, ``'REFLECT'``,
      ``'CAUSAL'`` (1-D), an int, or ``(lo, hi)`` pairs.
    input_dilation: must be 1 (kept for signature compatibility).
    kernel_dilation: int or one per spatial dim.
    feature_group_count: groups (``in_features`` for depthwise).
    use_bias: add a bias after the l1 distance.
    dtype: computation dtype (``None``: promoted from inputs and params).
    param_dtype: parameter storage dtype.
    precision: matmul precision of the weight gradient.
    kernel_init: kernel initialiser (standard normal).
    bias_init: bias initialiser (zeros).
    grad: ``'full_precision'`` (paper), ``'sign'`` or ``'unclipped'``.
    implementation: ``None``, ``'xla'`` or an accelerator backend.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> layer = AdderConv(features=4, kernel_size=(3, 3), use_bias=False)
    >>> x = jnp.zeros((1, 5, 5, 2))
    >>> y, _ = layer.init_with_output(jax.random.key(0), x)
    >>> bool((y <= 0).all())
    True
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
  kernel_init: Initializer = _module_utils.standard_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  grad: str = 'full_precision'
  implementation: str | None = None

  def __post_init__(self):
    _module_utils.check_layer_args(
        features={'features': self.features}, grad=self.grad,
        precision=self.precision, implementation=self.implementation,
        feature_group_count=self.feature_group_count,
        kernel_size=self.kernel_size, strides=self.strides,
        padding=self.padding, kernel_dilation=self.kernel_dilation)
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    kernel_size = _module_utils.kernel_size_tuple(self.kernel_size)
    in_features = jnp.shape(inputs)[-1]
    if in_features % self.feature_group_count:
      raise ValueError(f'feature_group_count={self.feature_group_count} does '
                       f'not divide the input features {in_features}.')
    kernel = self.param(
        'kernel', self.kernel_init,
        kernel_size + (in_features // self.feature_group_count, self.features),
        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    return _module_utils.apply_adder_conv(
        inputs, kernel, bias, kernel_size=kernel_size, strides=self.strides,
        padding=self.padding, input_dilation=self.input_dilation,
        kernel_dilation=self.kernel_dilation,
        feature_group_count=self.feature_group_count, grad=self.grad,
        implementation=self.implementation, precision=self.precision,
        dtype=self.dtype)


class AdderDense(nn.Module):
  """Fully connected adder layer, a drop-in for ``flax.linen.Dense``.

  Attributes:
    features: number of output features.
    use_bias: add a bias.
    dtype: computation dtype (``None``: promoted).
    param_dtype: parameter storage dtype.
    precision: matmul precision of the weight gradient.
    kernel_init: kernel initialiser (standard normal, as the official code).
    bias_init: bias initialiser (zeros).
    grad: ``'full_precision'`` (paper), ``'sign'`` or ``'unclipped'``.
    implementation: ``None``, ``'xla'`` or an accelerator backend.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> layer = AdderDense(features=3)
    >>> params = layer.init(jax.random.key(0), jnp.ones((2, 5)))
    >>> layer.apply(params, jnp.ones((2, 5))).shape
    (2, 3)
  """
  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Initializer = _module_utils.standard_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  grad: str = 'full_precision'
  implementation: str | None = None

  def __post_init__(self):
    _module_utils.check_layer_args(
        features={'features': self.features}, grad=self.grad,
        precision=self.precision, implementation=self.implementation)
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    if jnp.ndim(inputs) < 1:
      raise ValueError(f'AdderDense needs inputs with a feature axis, got a '
                       f'scalar of shape {jnp.shape(inputs)}.')
    kernel = self.param('kernel', self.kernel_init,
                        (jnp.shape(inputs)[-1], self.features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    return _module_utils.apply_adder_dense(
        inputs, kernel, bias, grad=self.grad,
        implementation=self.implementation, precision=self.precision,
        dtype=self.dtype)
