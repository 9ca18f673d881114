"""Flax NNX adder layers: drop-ins for ``nnx.Conv``, ``nnx.Linear`` and more.

``AdderConv``, ``AdderDense``, ``AdderLinearGeneral`` and
``AdderMultiHeadAttention`` replace ``nnx.Conv``, ``nnx.Linear``,
``nnx.LinearGeneral`` and ``nnx.MultiHeadAttention``.

Examples:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from adderjax.nnx import AdderConv
  >>> layer = AdderConv(3, 8, kernel_size=(3, 3), rngs=nnx.Rngs(0))
  >>> layer(jnp.ones((2, 16, 16, 3))).shape
  (2, 16, 16, 8)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from adderjax import _checks
from adderjax import _module_utils
from adderjax import attention as attention_ops
from adderjax.ops import geometry
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


def _feature_tuple(value: Any, name: str) -> tuple[int, ...]:
  """``value`` (an int or a sequence of ints) as a non-empty tuple."""
  if geometry.is_int(value):
    return (_checks.positive_int(name, value),)
  if not (isinstance(value, Sequence) and not isinstance(value, (str, bytes))
          and all(geometry.is_int(v) for v in value)):
    raise _checks.ArgumentTypeError(
        f'{name} must be an int or a non-empty tuple of ints, got '
        f'{_checks.describe(value)}.')
  values = tuple(value)
  if not values:
    raise ValueError(f'{name} must be an int or a non-empty tuple of ints, '
                     f'got {value!r}.')
  return tuple(_checks.positive_int(f'{name}[{i}]', v)
               for i, v in enumerate(values))


def _axis_tuple(axis: Any) -> tuple[int, ...]:
  """``axis`` (an int or a sequence of ints) as a non-empty tuple."""
  if geometry.is_int(axis):
    return (int(axis),)
  if (isinstance(axis, Sequence) and not isinstance(axis, (str, bytes)) and
      axis and all(geometry.is_int(a) for a in axis)):
    return tuple(int(a) for a in axis)
  raise _checks.ArgumentTypeError(
      f'axis must be an int or a non-empty tuple of ints, got '
      f'{_checks.describe(axis)}.')


def _flat_init(init: Initializer, n_in: int | None) -> Initializer:
  """``init`` called on a flat shape and reshaped, as ``nnx.LinearGeneral``.

  A kernel (``n_in`` leading input axes) is drawn as ``(prod(in),
  prod(out))``, so fan-based initialisers see the real fan-in and fan-out; a
  bias (``n_in=None``) as ``(prod(shape),)``.
  """
  def wrapped(key, shape, dtype):
    if n_in is None:
      flat = (math.prod(shape),)
    else:
      flat = (math.prod(shape[:n_in]), math.prod(shape[n_in:]))
    return jnp.reshape(init(key, flat, dtype), shape)
  return wrapped


class AdderLinearGeneral(nnx.Module):
  """Adder layer over several axes, a drop-in for ``flax.nnx.LinearGeneral``.

  ``y[..., f] = -sum_k |x[..., k] - W[k, f]|`` with ``k`` running over the
  contracted ``axis`` (moved to the end, in increasing order, as flax does)
  and ``f`` over ``out_features``. The kernel has ``LinearGeneral``'s (and
  :class:`adderjax.linen.AdderDenseGeneral`'s) layout
  ``(*in_features, *out_features)``; :func:`adderjax.optim.adder_mask`
  selects it.

  Args:
    in_features: the sizes of the contracted axes (an int or a tuple, one
      per entry of ``axis``).
    out_features: an int or a tuple of output axis sizes.
    axis: the contracted input axes (an int or a tuple).
    use_bias: add a bias of shape ``out_features``.
    dtype: computation dtype (``None``: promoted).
    param_dtype: parameter storage dtype.
    precision: matmul precision of the weight gradient.
    kernel_init: kernel initialiser (standard normal, as the official code),
      called on the flat ``(prod(in_features), prod(out_features))`` shape as
      ``LinearGeneral`` does.
    bias_init: bias initialiser (zeros).
    grad: ``'full_precision'`` (paper), ``'sign'`` or ``'unclipped'``.
    implementation: ``None``, ``'xla'`` or an accelerator backend.
    rngs: random streams (``params`` is used).

  Raises:
    TypeError: features or ``axis`` that are not ints or tuples of ints, or
      ``rngs`` that is not an ``nnx.Rngs``.
    ValueError: non-positive features, ``in_features`` and ``axis`` of
      different lengths, an unknown ``grad`` or ``implementation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = AdderLinearGeneral(8, (2, 4), rngs=nnx.Rngs(0))  # 2 heads of 4
    >>> layer.kernel.shape, layer(jnp.ones((3, 5, 8))).shape
    ((8, 2, 4), (3, 5, 2, 4))
    >>> out = AdderLinearGeneral((2, 4), 6, axis=(-2, -1), rngs=nnx.Rngs(0))
    >>> out.kernel.shape, out(jnp.ones((3, 5, 2, 4))).shape
    ((2, 4, 6), (3, 5, 6))
  """

  def __init__(self,
               in_features: int | Sequence[int],
               out_features: int | Sequence[int],
               *,
               axis: int | Sequence[int] = -1,
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
    in_shape = _feature_tuple(in_features, 'in_features')
    out_shape = _feature_tuple(out_features, 'out_features')
    axes = _axis_tuple(axis)
    if len(axes) != len(in_shape):
      raise ValueError(f'in_features and axis must have the same length, got '
                       f'in_features={in_features!r} and axis={axis!r}.')
    _module_utils.check_layer_args(features={}, grad=grad,
                                   precision=precision,
                                   implementation=implementation)
    self.kernel = nnx.Param(_flat_init(kernel_init, len(in_shape))(
        rngs.params(), in_shape + out_shape, param_dtype))
    self.bias = (nnx.Param(_flat_init(bias_init, None)(
        rngs.params(), out_shape, param_dtype)) if use_bias
                 else nnx.data(None))
    self.in_features = in_shape
    self.out_features = out_shape
    self.axis = axes
    self.use_bias = use_bias
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.grad = grad
    self.implementation = implementation

  def _contracted(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The contracted axes of an input of ``shape``, checked and sorted."""
    ndim = len(shape)
    if any(not -ndim <= a < ndim for a in self.axis):
      raise ValueError(f'axis={self.axis!r} is out of range for an input of '
                       f'shape {shape}.')
    axes = tuple(sorted(a % ndim for a in self.axis))
    if len(set(axes)) != len(axes):
      raise ValueError(f'axis={self.axis!r} names an axis of an input of '
                       f'shape {shape} twice.')
    if tuple(shape[a] for a in axes) != self.in_features:
      raise ValueError(
          f'{type(self).__name__} expects in_features={self.in_features} on '
          f'axes {axes}, got an input of shape {shape}.')
    return axes

  def __call__(self, inputs: jax.Array) -> jax.Array:
    shape = tuple(jnp.shape(inputs))
    if not shape:
      raise ValueError(f'{type(self).__name__} needs inputs with a feature '
                       f'axis, got a scalar of shape {shape}.')
    axes = self._contracted(shape)
    batch_axes = tuple(a for a in range(len(shape)) if a not in axes)
    x = jnp.transpose(inputs, batch_axes + axes)
    batch_shape = x.shape[:len(batch_axes)]
    n_in = math.prod(self.in_features)
    n_out = math.prod(self.out_features)
    bias = self.bias[...].reshape(n_out) if self.bias is not None else None
    y = _module_utils.apply_adder_dense(
        x.reshape(*batch_shape, n_in), self.kernel[...].reshape(n_in, n_out),
        bias, grad=self.grad, implementation=self.implementation,
        precision=self.precision, dtype=self.dtype)
    return y.reshape(*batch_shape, *self.out_features)


#: Projection layers of :class:`AdderMultiHeadAttention`.
PROJECTIONS = ('adder', 'dense')


class AdderMultiHeadAttention(nnx.Module):
  """Adder attention, a drop-in for ``flax.nnx.MultiHeadAttention``.

  The NNX twin of :class:`adderjax.linen.AdderMultiHeadAttention`, with the
  same parameters (copy one into the other and they compute the same). The
  query, key, value and output projections are adder layers
  (:class:`AdderLinearGeneral`, ``projection='adder'``) or
  ``nnx.LinearGeneral`` (``'dense'``), with flax's submodule names and
  layouts (``query.kernel`` ``(in, heads, head_dim)``, ``out.kernel``
  ``(heads, head_dim, out)``). The scores are negative l1 distances
  (``score='l1'``, :func:`adderjax.attention.l1_scores`) or dot products
  (``'dot'``); the map gets the identity fix of :mod:`adderjax.attention`
  (``identity``). With ``projection='dense'``, ``score='dot'`` and
  ``identity=None`` it computes what ``nnx.MultiHeadAttention`` does.

  An adder projection's outputs ``-sum|x - w|`` carry a large per-feature
  offset; ``projection_norm`` (a function of the feature count returning a
  module, e.g. ``lambda f: nnx.BatchNorm(f, use_fast_variance=False,
  rngs=rngs)``) builds ``query_norm``, ``key_norm``, ``value_norm`` (over
  heads x head_dim) and ``out_norm`` (over ``out_features``), applied to
  each projection's output when given.

  Args:
    num_heads: number of heads.
    in_features: input features (of queries, keys and values).
    qkv_features: total q/k/v features (``None``: ``in_features``);
      divisible by ``num_heads``.
    out_features: output features (``None``: ``in_features``).
    num_kv_heads: key and value heads (``None``: ``num_heads``); fewer
      than ``num_heads`` is grouped-query attention, as flax: query head
      ``h`` attends with key / value head ``h // (num_heads //
      num_kv_heads)``. The kv heads are repeated for their groups, so
      attention dropout draws one mask per query head (flax draws it on
      the grouped layout: same rate, other random numbers). Must divide
      ``num_heads``.
    in_kv_features: input features of keys and values (``None``:
      ``in_features``).
    dtype: computation dtype (``None``: promoted).
    param_dtype: parameter storage dtype.
    broadcast_dropout: one attention-dropout mask for all batch dims.
    dropout_rate: attention dropout.
    deterministic: no dropout (the call argument takes precedence; set by
      ``model.eval()`` / ``model.train()``).
    precision: matmul precision.
    kernel_init: q/k/v kernel initialiser (``None``: standard normal for
      adder projections, as the official code; flax's LeCun normal for
      ``'dense'``).
    out_kernel_init: output kernel initialiser (``None``: ``kernel_init``'s
      rule).
    bias_init: q/k/v bias initialiser.
    out_bias_init: output bias initialiser (``None``: ``bias_init``).
    use_bias: biases in the projections.
    normalize_qk: LayerNorm (``query_ln``, ``key_ln``) on each head's
      queries and keys, as flax.
    projection: ``'adder'`` or ``'dense'``.
    score: ``'l1'`` or ``'dot'``.
    identity: ``None``, ``'output'`` or ``'logits'`` (the rank fix).
    identity_weight: its ``lambda >= 0``.
    score_scale: logit scale (``None``: the default of the score).
    projection_norm: ``features -> nnx.Module`` applied to each projection's
      output, or ``None``.
    grad: gradient mode of the adder projections and l1 scores.
    implementation: adder backend.
    rngs: random streams (``params`` for the projections; a fork of
      ``dropout`` is kept when ``dropout_rate > 0``).

  Raises:
    TypeError: ``rngs`` that is not an ``nnx.Rngs``, a ``projection_norm``
      that is not callable, or arguments of the wrong kind.
    ValueError: a non-positive feature count, ``qkv_features`` not divisible
      by ``num_heads``, ``num_kv_heads`` not dividing ``num_heads``, an unknown ``projection`` / ``score`` / ``identity``
      / ``grad`` / ``implementation``, a negative ``identity_weight``,
      ``dropout_rate`` outside [0, 1) or ``score_scale <= 0``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = AdderMultiHeadAttention(2, 6, qkv_features=8,
    ...                                 rngs=nnx.Rngs(0))
    >>> layer.query.kernel.shape, layer(jnp.ones((3, 5, 6))).shape
    ((6, 2, 4), (3, 5, 6))
    >>> rngs = nnx.Rngs(0)
    >>> normed = AdderMultiHeadAttention(
    ...     2, 6, projection_norm=lambda f: nnx.BatchNorm(
    ...         f, use_fast_variance=False, rngs=rngs), rngs=rngs)
    >>> normed.query_norm.scale.shape, normed(jnp.ones((3, 5, 6))).shape
    ((6,), (3, 5, 6))
  """

  def __init__(self,
               num_heads: int,
               in_features: int,
               qkv_features: int | None = None,
               out_features: int | None = None,
               num_kv_heads: int | None = None,
               in_kv_features: int | None = None,
               *,
               dtype: Any = None,
               param_dtype: Any = jnp.float32,
               broadcast_dropout: bool = True,
               dropout_rate: float = 0.0,
               deterministic: bool | None = None,
               precision: Any = None,
               kernel_init: Initializer | None = None,
               out_kernel_init: Initializer | None = None,
               bias_init: Initializer = nnx.initializers.zeros_init(),
               out_bias_init: Initializer | None = None,
               use_bias: bool = True,
               normalize_qk: bool = False,
               projection: str = 'adder',
               score: str = 'l1',
               identity: str | None = 'output',
               identity_weight: float = 1.0,
               score_scale: float | None = None,
               projection_norm: Callable[[int], nnx.Module] | None = None,
               grad: str = 'full_precision',
               implementation: str | None = None,
               rngs: nnx.Rngs):
    _check_rngs(rngs, type(self).__name__)
    num_heads = _checks.positive_int('num_heads', num_heads)
    in_features = _checks.positive_int('in_features', in_features)
    qkv_features = (in_features if qkv_features is None else
                    _checks.positive_int('qkv_features', qkv_features))
    out_features = (in_features if out_features is None else
                    _checks.positive_int('out_features', out_features))
    if qkv_features % num_heads:
      raise ValueError(f'qkv_features={qkv_features} is not divisible by '
                       f'num_heads={num_heads}.')
    num_kv_heads = (num_heads if num_kv_heads is None else
                    _checks.positive_int('num_kv_heads', num_kv_heads))
    if num_heads % num_kv_heads:
      raise ValueError(f'num_kv_heads={num_kv_heads} does not divide '
                       f'num_heads={num_heads}.')
    in_kv_features = (in_features if in_kv_features is None else
                      _checks.positive_int('in_kv_features', in_kv_features))
    _checks.choice('projection', projection, PROJECTIONS)
    _checks.choice('score', score, attention_ops.SCORES)
    _checks.choice('identity', identity,
                   (None,) + attention_ops.IDENTITY_MODES)
    identity_weight = _checks.finite_number('identity_weight',
                                            identity_weight, low=0)
    dropout_rate = _checks.finite_number('dropout_rate', dropout_rate, low=0,
                                         high=1, high_open=True)
    if score_scale is not None:
      score_scale = _checks.finite_number('score_scale', score_scale, low=0,
                                          low_open=True)
    if projection_norm is not None and not callable(projection_norm):
      raise _checks.ArgumentTypeError(
          f'projection_norm must be None or a function of the feature count '
          f'returning a module, got {_checks.describe(projection_norm)}.')
    _module_utils.check_layer_args(features={}, grad=grad,
                                   precision=precision,
                                   implementation=implementation)
    self.num_heads = num_heads
    self.in_features = in_features
    self.qkv_features = qkv_features
    self.out_features = out_features
    self.num_kv_heads = num_kv_heads
    self.in_kv_features = in_kv_features
    self.head_dim = qkv_features // num_heads
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.broadcast_dropout = broadcast_dropout
    self.dropout_rate = dropout_rate
    self.deterministic = deterministic
    self.precision = precision
    self.use_bias = use_bias
    self.normalize_qk = normalize_qk
    self.projection = projection
    self.score = score
    self.identity = identity
    self.identity_weight = identity_weight
    self.score_scale = score_scale
    self.grad = grad
    self.implementation = implementation

    heads = (num_heads, self.head_dim)
    kv_heads = (num_kv_heads, self.head_dim)
    # Built in nnx.MultiHeadAttention's order (query, key, value, LayerNorms,
    # out), so the same rngs draw the same dense parameters.
    self.query = self._projection(in_features, heads, -1, kernel_init,
                                  bias_init, rngs)
    self.key = self._projection(in_kv_features, kv_heads, -1, kernel_init,
                                bias_init, rngs)
    self.value = self._projection(in_kv_features, kv_heads, -1, kernel_init,
                                  bias_init, rngs)
    if normalize_qk:
      self.query_ln = nnx.LayerNorm(self.head_dim, use_bias=False,
                                    dtype=dtype, param_dtype=param_dtype,
                                    rngs=rngs)
      self.key_ln = nnx.LayerNorm(self.head_dim, use_bias=False, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    else:
      self.query_ln = nnx.data(None)
      self.key_ln = nnx.data(None)
    self.out = self._projection(heads, out_features, (-2, -1),
                                out_kernel_init or kernel_init,
                                out_bias_init or bias_init, rngs)
    if projection_norm is None:
      self.query_norm = nnx.data(None)
      self.key_norm = nnx.data(None)
      self.value_norm = nnx.data(None)
      self.out_norm = nnx.data(None)
    else:
      kv_features = num_kv_heads * self.head_dim
      self.query_norm = projection_norm(qkv_features)
      self.key_norm = projection_norm(kv_features)
      self.value_norm = projection_norm(kv_features)
      self.out_norm = projection_norm(out_features)
    self.rngs = rngs.dropout.fork() if dropout_rate > 0 else nnx.data(None)

  def _projection(self, in_features, out_features, axis, kernel_init,
                  bias_init, rngs):
    if self.projection == 'adder':
      return AdderLinearGeneral(
          in_features, out_features, axis=axis, use_bias=self.use_bias,
          dtype=self.dtype, param_dtype=self.param_dtype,
          precision=self.precision,
          kernel_init=kernel_init or _module_utils.standard_normal(),
          bias_init=bias_init, grad=self.grad,
          implementation=self.implementation, rngs=rngs)
    return nnx.LinearGeneral(
        in_features, out_features, axis=axis, use_bias=self.use_bias,
        dtype=self.dtype, param_dtype=self.param_dtype,
        precision=self.precision,
        kernel_init=kernel_init or nnx.initializers.lecun_normal(),
        bias_init=bias_init, rngs=rngs)

  @staticmethod
  def _normed(norm, y: jax.Array, heads: bool) -> jax.Array:
    """``norm`` over the features (heads x head_dim when ``heads``)."""
    if norm is None:
      return y
    shape = y.shape
    if heads:
      y = y.reshape(*shape[:-2], shape[-2] * shape[-1])
    return norm(y).reshape(shape)

  def __call__(self, inputs_q: jax.Array, inputs_k: jax.Array | None = None,
               inputs_v: jax.Array | None = None, *,
               mask: jax.Array | None = None,
               deterministic: bool | None = None,
               rngs: nnx.Rngs | nnx.RngStream | None = None,
               sow_weights: bool = False) -> jax.Array:
    """Attends from ``inputs_q`` to ``inputs_k`` / ``inputs_v``.

    Args:
      inputs_q: ``[batch..., q_length, in_features]``.
      inputs_k: ``[batch..., kv_length, in_kv_features]`` (``None``: the
        queries' inputs, self-attention).
      inputs_v: ``[batch..., kv_length, in_kv_features]`` (``None``: the
        keys').
      mask: boolean ``[batch..., heads, q_length, kv_length]``
        (broadcastable); ``False`` entries get no weight.
      deterministic: no dropout (``None``: the attribute).
      rngs: dropout randomness (``None``: the stream kept at construction;
        an ``nnx.Rngs`` gives its ``dropout`` stream).
      sow_weights: store the map applied to the values (identity included)
        as the ``nnx.Intermediate`` ``attention_weights``.

    Returns:
      ``[batch..., q_length, out_features]``.

    Raises:
      ValueError: inputs of fewer than 2 axes or with other than
        ``in_features`` (queries) / ``in_kv_features`` (keys, values)
        features, ``inputs_v`` without ``inputs_k``, an
        identity with cross-attention, dropout without ``deterministic`` or
        without randomness.
    """
    if inputs_k is None:
      if inputs_v is not None:
        raise ValueError('inputs_v given without inputs_k; to use one input '
                         'for keys and values pass it as inputs_k.')
      inputs_k = inputs_q
    if inputs_v is None:
      inputs_v = inputs_k
    for name, a, features, what in (
        ('inputs_q', inputs_q, self.in_features, 'in_features'),
        ('inputs_k', inputs_k, self.in_kv_features, 'in_kv_features'),
        ('inputs_v', inputs_v, self.in_kv_features, 'in_kv_features')):
      shape = jnp.shape(a)
      if len(shape) < 2 or shape[-1] != features:
        raise ValueError(f'{name} must be [batch..., length, {what}='
                         f'{features}], got shape {shape}.')
    q = self._normed(self.query_norm, self.query(inputs_q), True)
    k = self._normed(self.key_norm, self.key(inputs_k), True)
    v = self._normed(self.value_norm, self.value(inputs_v), True)
    if self.normalize_qk:
      q = self.query_ln(q)
      k = self.key_ln(k)
    if self.num_kv_heads != self.num_heads:  # grouped-query attention
      group = self.num_heads // self.num_kv_heads
      k = jnp.repeat(k, group, axis=-2)
      v = jnp.repeat(v, group, axis=-2)
    dropout_rng = None
    if self.dropout_rate > 0:  # as flax: only dropout needs the flag
      if deterministic is None:
        deterministic = self.deterministic
      if deterministic is None:
        raise ValueError(
            f'dropout_rate={self.dropout_rate} needs `deterministic`, as a '
            'call argument or an attribute (set by model.train() / '
            'model.eval()); got None for both.')
      if not deterministic:
        if rngs is None:
          rngs = self.rngs
        elif isinstance(rngs, nnx.Rngs):
          rngs = rngs.dropout
        if rngs is None:
          raise ValueError('dropout with deterministic=False needs `rngs`.')
        dropout_rng = rngs()
    else:
      deterministic = True
    out, weights = _module_utils.module_attend(
        self, q, k, v, mask=mask, dropout_rng=dropout_rng,
        deterministic=deterministic, return_weights=sow_weights)
    if sow_weights:
      self.sow(nnx.Intermediate, 'attention_weights', weights)
    return self._normed(self.out_norm, self.out(out), False)
