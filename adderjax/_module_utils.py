"""Input handling shared by the Linen and NNX adder modules.

Mirrors what ``flax.linen.Conv`` / ``flax.nnx.Conv`` do around the
convolution call, so the adder modules are drop-in replacements: any number of
leading batch dims (flattened, then restored; none means one example),
``'CIRCULAR'`` / ``'REFLECT'`` / ``'CAUSAL'`` padding done by padding the
input, and the same promote-dtype behaviour.
"""

from __future__ import annotations

from collections.abc import Sequence

from flax.linen import dtypes
import jax
import jax.numpy as jnp
import numpy as np

from adderjax import attention
from adderjax.ops import adder
from adderjax.ops import backends
from adderjax.ops import geometry
from adderjax.ops import padding as padding_lib


def _broadcast(value, n: int, name: str) -> tuple[int, ...]:
  if value is None:
    value = 1
  if geometry.is_int(value):
    return (int(value),) * n
  value = tuple(value)
  if len(value) != n:
    raise ValueError(f'{name} must have {n} entries, got {value!r}.')
  return value


def kernel_size_tuple(kernel_size) -> tuple[int, ...]:
  """``kernel_size`` as a tuple of positive ints (an int means 1-D)."""
  if geometry.is_int(kernel_size):
    out = (int(kernel_size),)
  elif (isinstance(kernel_size, Sequence) and
        not isinstance(kernel_size, (str, bytes)) and
        all(geometry.is_int(k) for k in kernel_size)):
    out = tuple(int(k) for k in kernel_size)
  else:
    raise TypeError(f'kernel_size must be an int or a sequence of ints, got '
                    f'{kernel_size!r}.')
  if not out or any(k < 1 for k in out):
    raise ValueError(f'kernel_size must be one or more positive ints, got '
                     f'{kernel_size!r}.')
  return out


def _check_positive_int(value, name: str) -> None:
  if not geometry.is_int(value) or value < 1:
    raise ValueError(f'{name} must be a positive int, got {value!r}.')


_PAD_NAMES = ('SAME', 'VALID', 'CIRCULAR', 'REFLECT', 'CAUSAL')


def _check_padding(padding, n: int) -> None:
  if isinstance(padding, str):
    if padding.upper() not in _PAD_NAMES:
      raise ValueError(f'padding must be one of {_PAD_NAMES}, an int or '
                       f'(lo, hi) pairs, got {padding!r}.')
    return
  if geometry.is_int(padding):
    if padding < 0:
      raise ValueError(f'padding must be non-negative, got {padding!r}.')
    return
  # Sequences are checked entry by entry by the geometry (with the input).
  geometry.canonicalize_padding(padding, (1,) * n, (1,) * n, (1,) * n,
                                (1,) * n)


def check_implementation(implementation) -> None:
  """None or a registered backend name (platform checked when called)."""
  if implementation is not None and (
      not isinstance(implementation, str) or
      implementation not in backends.available()):
    raise ValueError(f'implementation must be None or one of '
                     f'{backends.available()}, got {implementation!r}.')


def check_layer_args(*, features: dict[str, object], grad, precision,
                     implementation, feature_group_count=1, kernel_size=None,
                     strides=None, padding=None,
                     kernel_dilation=None) -> None:
  """Validates an adder module's arguments when it is built.

  Args:
    features: the feature counts by argument name (``{'features': 8}``, or
      ``in_features`` and ``out_features`` for NNX).
    grad, precision, implementation, feature_group_count: as the modules.
    kernel_size, strides, padding, kernel_dilation: the convolution's (None
      for a dense layer).

  Raises ``TypeError`` / ``ValueError`` naming the bad value, so that a typo
  fails where it is written rather than at the first call or in the
  backward pass.
  """
  for name, value in features.items():
    _check_positive_int(value, name)
  _check_positive_int(feature_group_count, 'feature_group_count')
  adder.check_grad(grad)
  adder.check_precision(precision)
  check_implementation(implementation)
  if kernel_size is not None:
    n = len(kernel_size_tuple(kernel_size))
    geometry.as_int_tuple(strides, n, 'strides')
    geometry.as_int_tuple(kernel_dilation, n, 'kernel_dilation')
    _check_padding(padding, n)


def apply_adder_conv(inputs, kernel, bias, *, kernel_size, strides, padding,
                     input_dilation, kernel_dilation, feature_group_count,
                     grad, implementation, precision, dtype):
  """Runs :func:`adder_conv` the way flax's Conv runs ``conv_general_dilated``."""
  nsp = len(kernel_size)
  if input_dilation not in (None, 1) and any(
      d != 1 for d in _broadcast(input_dilation, nsp, 'input_dilation')):
    raise ValueError(f'input_dilation={input_dilation!r} is not supported by '
                     'adder layers (only 1).')
  inputs = jnp.asarray(inputs)
  if inputs.ndim < nsp + 1:
    raise ValueError(f'input of shape {inputs.shape} has too few dims for a '
                     f'{nsp}-D adder convolution (need spatial dims and '
                     'features).')
  num_batch = inputs.ndim - (nsp + 1)
  batch_shape = inputs.shape[:num_batch]
  if num_batch != 1:
    inputs = inputs.reshape((-1,) + inputs.shape[num_batch:])
  dilation = _broadcast(kernel_dilation, nsp, 'kernel_dilation')
  inputs, pad = padding_lib.pad_input(inputs, kernel_size, padding, dilation)
  inputs, kernel, bias = dtypes.promote_dtype(inputs, kernel, bias,
                                              dtype=dtype)
  y = adder.adder_conv(inputs, kernel, strides if strides is not None else 1,
                       pad, dilation, feature_group_count, grad=grad,
                       implementation=implementation, precision=precision)
  if bias is not None:
    y = y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)
  if num_batch != 1:
    y = y.reshape(batch_shape + y.shape[1:])
  return y


def apply_adder_dense(inputs, kernel, bias, *, grad, implementation,
                      precision, dtype):
  """Runs :func:`adder_dense` the way flax's Dense runs its dot product."""
  inputs, kernel, bias = dtypes.promote_dtype(inputs, kernel, bias,
                                              dtype=dtype)
  y = adder.adder_dense(inputs, kernel, grad=grad,
                        implementation=implementation, precision=precision)
  if bias is not None:
    y = y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)
  return y


def standard_normal():
  """The official code's adder-filter init: i.i.d. N(0, 1)."""
  return jax.nn.initializers.normal(stddev=1.0)


def module_attend(module, q, k, v, *, mask, dropout_rng, deterministic,
                  return_weights):
  """:func:`adderjax.attention.attend` with an attention module's settings.

  ``module`` is a Linen or NNX ``AdderMultiHeadAttention`` (the fields
  ``score``, ``score_scale``, ``identity``, ``identity_weight``,
  ``dropout_rate``, ``broadcast_dropout``, ``grad``, ``implementation``,
  ``precision``, ``dtype``).
  """
  return attention.attend(
      q, k, v, score=module.score, bias=None, mask=mask,
      scale=module.score_scale, identity=module.identity,
      identity_weight=module.identity_weight, dropout_rng=dropout_rng,
      dropout_rate=module.dropout_rate,
      broadcast_dropout=module.broadcast_dropout,
      deterministic=deterministic, grad=module.grad,
      implementation=module.implementation, precision=module.precision,
      dtype=module.dtype, return_weights=return_weights)
