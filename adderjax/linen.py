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

import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from adderjax import _checks
from adderjax import _module_utils
from adderjax import attention as attention_ops
from adderjax.ops.geometry import PaddingLike

Initializer = Any

#: Projection layers of :class:`AdderMultiHeadAttention`.
PROJECTIONS = ('adder', 'dense')


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


def _axes_tuple(axis, ndim: int, name: str) -> tuple[int, ...]:
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  if not axes or any(not isinstance(a, int) or isinstance(a, bool)
                     for a in axes):
    raise TypeError(f'{name} must be an int or a non-empty tuple of ints, got '
                    f'{axis!r}.')
  if any(not -ndim <= a < ndim for a in axes):
    raise ValueError(f'{name}={axis!r} is out of range for an input with '
                     f'{ndim} axes.')
  axes = tuple(sorted(a % ndim for a in axes))
  if len(set(axes)) != len(axes):
    raise ValueError(f'{name}={axis!r} names an axis twice.')
  return axes


class AdderDenseGeneral(nn.Module):
  """Adder layer over several axes, a drop-in for ``flax.linen.DenseGeneral``.

  ``y[..., f] = -sum_k |x[..., k] - W[k, f]|`` with ``k`` running over the
  contracted ``axis`` (moved to the end) and ``f`` over ``features`` (a
  tuple gives several output axes). The kernel has ``DenseGeneral``'s layout
  ``(*in_shape, *features)``; :func:`adderjax.optim.adder_mask` selects it.

  Attributes:
    features: an int or a tuple of output axis sizes.
    axis: the contracted input axes (an int or a tuple).
    use_bias: add a bias of shape ``features``.
    dtype: computation dtype (``None``: promoted).
    param_dtype: parameter storage dtype.
    precision: matmul precision of the weight gradient.
    kernel_init: kernel initialiser (standard normal, as the official code).
    bias_init: bias initialiser (zeros).
    grad: ``'full_precision'`` (paper), ``'sign'`` or ``'unclipped'``.
    implementation: ``None``, ``'xla'`` or an accelerator backend.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> layer = AdderDenseGeneral(features=(2, 4))  # 2 heads of 4
    >>> v = layer.init(jax.random.key(0), jnp.ones((3, 5, 8)))
    >>> v['params']['kernel'].shape, layer.apply(v, jnp.ones((3, 5, 8))).shape
    ((8, 2, 4), (3, 5, 2, 4))
  """
  features: int | tuple[int, ...]
  axis: int | tuple[int, ...] = -1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Initializer = _module_utils.standard_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  grad: str = 'full_precision'
  implementation: str | None = None

  def __post_init__(self):
    features = ((self.features,) if isinstance(self.features, int)
                else tuple(self.features))
    _module_utils.check_layer_args(
        features={f'features[{i}]': f for i, f in enumerate(features)},
        grad=self.grad, precision=self.precision,
        implementation=self.implementation)
    if not features:
      raise ValueError('features must be an int or a non-empty tuple, got ().')
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    features = ((self.features,) if isinstance(self.features, int)
                else tuple(self.features))
    ndim = jnp.ndim(inputs)
    if ndim < 1:
      raise ValueError(f'AdderDenseGeneral needs inputs with a feature axis, '
                       f'got a scalar of shape {jnp.shape(inputs)}.')
    axes = _axes_tuple(self.axis, ndim, 'axis')
    shape = jnp.shape(inputs)
    in_shape = tuple(shape[a] for a in axes)
    n_in, n_out = math.prod(in_shape), math.prod(features)

    def kernel_init(rng, shape, dtype):
      # As flax's DenseGeneral: a fan-based initialiser sees (in, out).
      return jnp.reshape(self.kernel_init(rng, (n_in, n_out), dtype), shape)

    kernel = self.param('kernel', kernel_init, in_shape + features,
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, features, self.param_dtype)
            if self.use_bias else None)
    batch_axes = tuple(a for a in range(ndim) if a not in axes)
    x = jnp.transpose(inputs, batch_axes + axes)
    batch_shape = x.shape[:len(batch_axes)]
    y = _module_utils.apply_adder_dense(
        x.reshape(*batch_shape, n_in), kernel.reshape(n_in, n_out),
        None if bias is None else bias.reshape(n_out), grad=self.grad,
        implementation=self.implementation, precision=self.precision,
        dtype=self.dtype)
    return y.reshape(*batch_shape, *features)


class AdderMultiHeadAttention(nn.Module):
  """Adder attention, a drop-in for ``flax.linen.MultiHeadDotProductAttention``.

  The query, key, value and output projections are adder layers
  (:class:`AdderDenseGeneral`, ``projection='adder'``) or ``nn.DenseGeneral``
  (``'dense'``), with flax's parameter names and layouts (``query/kernel``
  ``(in, heads, head_dim)``, ``out/kernel`` ``(heads, head_dim, out)``). The
  scores are negative l1 distances (``score='l1'``,
  :func:`adderjax.attention.l1_scores`) or dot products (``'dot'``); the map
  gets the identity fix of :mod:`adderjax.attention` (``identity``).

  An adder projection's outputs ``-sum|x - w|`` carry a large per-feature
  offset; ``projection_norm`` (e.g. ``functools.partial(nn.BatchNorm,
  use_running_average=not train, use_fast_variance=False)``, as the model
  zoo's ViT does) normalises each projection's output over its last axis
  (heads x head_dim for q, k, v) when given.

  Attributes:
    num_heads: number of heads.
    dtype: computation dtype (``None``: promoted).
    param_dtype: parameter storage dtype.
    qkv_features: total q/k/v features (``None``: the input features);
      divisible by ``num_heads``.
    out_features: output features (``None``: the query's features).
    broadcast_dropout: one attention-dropout mask for all batch dims and
      heads.
    dropout_rate: attention dropout.
    deterministic: no dropout (also a call argument).
    precision: matmul precision.
    kernel_init: q/k/v kernel initialiser (``None``: standard normal for
      adder projections, as the official code; flax's LeCun normal for
      ``'dense'``).
    out_kernel_init: output kernel initialiser (``None``: ``kernel_init``'s
      rule).
    bias_init: q/k/v bias initialiser.
    out_bias_init: output bias initialiser (``None``: ``bias_init``).
    use_bias: biases in the projections.
    normalize_qk: LayerNorm on each head's queries and keys (as flax).
    projection: ``'adder'`` or ``'dense'``.
    score: ``'l1'`` or ``'dot'``.
    identity: ``None``, ``'output'`` or ``'logits'`` (the rank fix).
    identity_weight: its ``lambda``.
    score_scale: logit scale (``None``: the default of the score).
    projection_norm: module factory applied to each projection's output
      (called with ``name=``), or ``None``.
    grad: gradient mode of the adder projections and l1 scores.
    implementation: adder backend.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> layer = AdderMultiHeadAttention(num_heads=2, qkv_features=8)
    >>> x = jnp.ones((3, 5, 6))
    >>> v = layer.init(jax.random.key(0), x)
    >>> v['params']['query']['kernel'].shape, layer.apply(v, x).shape
    ((6, 2, 4), (3, 5, 6))
  """
  num_heads: int
  dtype: Any = None
  param_dtype: Any = jnp.float32
  qkv_features: int | None = None
  out_features: int | None = None
  broadcast_dropout: bool = True
  dropout_rate: float = 0.0
  deterministic: bool | None = None
  precision: Any = None
  kernel_init: Initializer | None = None
  out_kernel_init: Initializer | None = None
  bias_init: Initializer = nn.initializers.zeros_init()
  out_bias_init: Initializer | None = None
  use_bias: bool = True
  normalize_qk: bool = False
  projection: str = 'adder'
  score: str = 'l1'
  identity: str | None = 'output'
  identity_weight: float = 1.0
  score_scale: float | None = None
  projection_norm: Any = None
  grad: str = 'full_precision'
  implementation: str | None = None

  def __post_init__(self):
    _checks.positive_int('num_heads', self.num_heads)
    for name in ('qkv_features', 'out_features'):
      if getattr(self, name) is not None:
        _checks.positive_int(name, getattr(self, name))
    _checks.choice('projection', self.projection, PROJECTIONS)
    _checks.choice('score', self.score, attention_ops.SCORES)
    if self.identity is not None:
      _checks.choice('identity', self.identity, attention_ops.IDENTITY_MODES)
    _checks.finite_number('identity_weight', self.identity_weight, low=0)
    _checks.finite_number('dropout_rate', self.dropout_rate, low=0, high=1,
                          high_open=True)
    if self.score_scale is not None:
      _checks.finite_number('score_scale', self.score_scale, low=0,
                            low_open=True)
    _module_utils.check_layer_args(
        features={'num_heads': self.num_heads}, grad=self.grad,
        precision=self.precision, implementation=self.implementation)
    super().__post_init__()

  def _projection(self, features, axis, kernel_init, bias_init, name):
    if self.projection == 'adder':
      init = kernel_init or _module_utils.standard_normal()
      return AdderDenseGeneral(
          features=features, axis=axis, use_bias=self.use_bias,
          dtype=self.dtype, param_dtype=self.param_dtype,
          precision=self.precision, kernel_init=init, bias_init=bias_init,
          grad=self.grad, implementation=self.implementation, name=name)
    init = kernel_init or nn.initializers.lecun_normal()
    return nn.DenseGeneral(
        features=features, axis=axis, use_bias=self.use_bias,
        dtype=self.dtype, param_dtype=self.param_dtype,
        precision=self.precision, kernel_init=init, bias_init=bias_init,
        name=name)

  def _normed(self, y, name):
    """``projection_norm`` over the features (heads x head_dim for q/k/v)."""
    if self.projection_norm is None:
      return y
    shape = y.shape
    if name != 'out':
      y = y.reshape(*shape[:-2], shape[-2] * shape[-1])
    return self.projection_norm(name=f'{name}_norm')(y).reshape(shape)

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_k: jax.Array | None = None,
               inputs_v: jax.Array | None = None, *,
               inputs_kv: jax.Array | None = None,
               mask: jax.Array | None = None,
               deterministic: bool | None = None,
               dropout_rng: jax.Array | None = None,
               sow_weights: bool = False) -> jax.Array:
    """Attends from ``inputs_q`` to ``inputs_k`` / ``inputs_v``.

    Args:
      inputs_q: ``[batch..., q_length, q_features]``.
      inputs_k: ``[batch..., kv_length, k_features]`` (``None``: the
        queries' inputs, self-attention).
      inputs_v: ``[batch..., kv_length, v_features]`` (``None``: the keys').
      inputs_kv: keys and values from one input (flax's older argument).
      mask: boolean ``[batch..., heads, q_length, kv_length]``
        (broadcastable); ``False`` entries get no weight.
      deterministic: no dropout (``None``: the attribute).
      dropout_rng: key for attention dropout (``None``: the ``'dropout'``
        stream).
      sow_weights: store the map applied to the values (identity included)
        in the ``'intermediates'`` collection as ``attention_weights``.

    Returns:
      ``[batch..., q_length, out_features]``.
    """
    if inputs_kv is not None:
      if inputs_k is not None or inputs_v is not None:
        raise ValueError('give either inputs_kv or inputs_k / inputs_v, not '
                         'both.')
      inputs_k = inputs_v = inputs_kv
    if inputs_k is None:
      if inputs_v is not None:
        raise ValueError('inputs_v given without inputs_k.')
      inputs_k = inputs_q
    if inputs_v is None:
      inputs_v = inputs_k
    for name, a in (('inputs_q', inputs_q), ('inputs_k', inputs_k),
                    ('inputs_v', inputs_v)):
      if jnp.ndim(a) < 2:
        raise ValueError(f'{name} must be [batch..., length, features], got '
                         f'shape {jnp.shape(a)}.')
    features = self.out_features or inputs_q.shape[-1]
    qkv_features = self.qkv_features or inputs_q.shape[-1]
    if qkv_features % self.num_heads:
      raise ValueError(f'qkv_features={qkv_features} is not divisible by '
                       f'num_heads={self.num_heads}.')
    head_dim = qkv_features // self.num_heads
    heads = (self.num_heads, head_dim)
    q = self._normed(self._projection(heads, -1, self.kernel_init,
                                      self.bias_init, 'query')(inputs_q),
                     'query')
    k = self._normed(self._projection(heads, -1, self.kernel_init,
                                      self.bias_init, 'key')(inputs_k), 'key')
    v = self._normed(self._projection(heads, -1, self.kernel_init,
                                      self.bias_init, 'value')(inputs_v),
                     'value')
    if self.normalize_qk:
      q = nn.LayerNorm(name='query_ln', use_bias=False, dtype=self.dtype,
                       param_dtype=self.param_dtype)(q)
      k = nn.LayerNorm(name='key_ln', use_bias=False, dtype=self.dtype,
                       param_dtype=self.param_dtype)(k)
    if self.dropout_rate > 0:  # as flax: only dropout needs the flag
      deterministic = nn.merge_param('deterministic', self.deterministic,
                                     deterministic)
    else:
      deterministic = True
    if not deterministic and self.dropout_rate > 0 and dropout_rng is None:
      dropout_rng = self.make_rng('dropout')
    out, weights = _module_utils.module_attend(
        self, q, k, v, mask=mask, dropout_rng=dropout_rng,
        deterministic=deterministic, return_weights=sow_weights)
    if sow_weights:
      self.sow('intermediates', 'attention_weights', weights)
    out_init = self.out_kernel_init or self.kernel_init
    y = self._projection(features, (-2, -1), out_init,
                         self.out_bias_init or self.bias_init, 'out')(out)
    return self._normed(y, 'out')


def attention_maps(model: nn.Module, variables, *args,
                   **kwargs) -> dict[str, jax.Array]:
  """The attention maps of every :class:`AdderMultiHeadAttention` in a model.

  Runs ``model.apply(variables, *args, **kwargs)`` with ``sow_weights=True``
  forced on each attention call (through ``flax.linen.intercept_methods``;
  the model's code is not changed) and returns the maps the attentions
  applied to their values, identity fix included, keyed by the module path.

  Args:
    model: a Linen model holding :class:`AdderMultiHeadAttention` modules.
    variables: its variables.
    *args: inputs of ``model.apply``.
    **kwargs: keyword inputs (e.g. ``train=False``); ``mutable`` must not be
      given.

  Returns:
    ``{'block0/attn': [batch..., heads, q_length, kv_length], ...}``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from adderjax.models import create_model
    >>> model = create_model('vit_tiny', kind='adder', num_classes=10,
    ...                      depth=1, hidden=8, num_heads=2, mlp_dim=8)
    >>> x = jnp.zeros((3, 28, 28, 1))
    >>> v = model.init(jax.random.key(0), x)
    >>> {k: m.shape for k, m in attention_maps(model, v, x).items()}
    {'block0/attn': (3, 2, 16, 16)}
  """
  if 'mutable' in kwargs:
    raise ValueError('attention_maps sets `mutable` itself; do not pass it.')

  def force_sow(next_fun, args_, kwargs_, context):
    if (isinstance(context.module, AdderMultiHeadAttention) and
        context.method_name == '__call__'):
      kwargs_ = dict(kwargs_, sow_weights=True)
    return next_fun(*args_, **kwargs_)

  with nn.intercept_methods(force_sow):
    _, state = model.apply(variables, *args, mutable=['intermediates'],
                           **kwargs)
  flat = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(state.get('intermediates', {})), sep='/')
  suffix = '/attention_weights'
  return {k[:-len(suffix)]: v[0] for k, v in flat.items()
          if k.endswith(suffix)}
