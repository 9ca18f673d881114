"""Input handling shared by the Linen and NNX adder modules.

Mirrors what ``flax.linen.Conv`` / ``flax.nnx.Conv`` do around the
convolution call, so the adder modules are drop-in replacements: any number of
leading batch dims (flattened, then restored; none means one example),
``'CIRCULAR'`` / ``'REFLECT'`` / ``'CAUSAL'`` padding done by padding the
input, and the same promote-dtype behaviour.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adderjax.ops import adder


def _broadcast(value, n: int, name: str) -> tuple[int, ...]:
  if value is None:
    value = 1
  if isinstance(value, (int, np.integer)):
    return (int(value),) * n
  value = tuple(value)
  if len(value) != n:
    raise ValueError(f'{name} must have {n} entries, got {value!r}.')
  return value


def kernel_size_tuple(kernel_size) -> tuple[int, ...]:
  if isinstance(kernel_size, (int, np.integer)):
    return (int(kernel_size),)
  if not isinstance(kernel_size, Sequence):
    raise TypeError(f'kernel_size must be an int or a sequence of ints, got '
                    f'{kernel_size!r}.')
  return tuple(int(k) for k in kernel_size)


def apply_adder_conv(inputs, kernel, bias, *, kernel_size, strides, padding,
                     input_dilation, kernel_dilation, feature_group_count,
                     grad, implementation, precision, dtype):
  """Runs :func:`adder_conv` the way flax's Conv runs ``conv_general_dilated``."""
  from flax.linen import dtypes  # pylint: disable=g-import-not-at-top
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
  pad = padding.upper() if isinstance(padding, str) else padding
  if pad in ('CIRCULAR', 'REFLECT'):
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
    widths = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
    inputs = jnp.pad(inputs, widths,
                     mode={'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}[pad])
    pad = 'VALID'
  elif pad == 'CAUSAL':
    if nsp != 1:
      raise ValueError("padding='CAUSAL' is only defined for 1-D adder "
                       f'convolutions, got kernel_size={kernel_size}.')
    inputs = jnp.pad(inputs, [(0, 0), (dilation[0] * (kernel_size[0] - 1), 0),
                              (0, 0)])
    pad = 'VALID'
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
  from flax.linen import dtypes  # pylint: disable=g-import-not-at-top
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
