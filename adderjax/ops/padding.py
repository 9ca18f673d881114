"""The paddings that pad the input: ``'CIRCULAR'``, ``'REFLECT'``, ``'CAUSAL'``.

The ops (:func:`adderjax.adder_conv`,
:func:`adderjax.ops.geometry.make_geometry`) take the zero paddings:
``'SAME'``, ``'VALID'``, ints and ``(lo, hi)`` pairs. ``flax.linen.Conv``
accepts three more, which it implements by padding the input before a
``'VALID'`` convolution;
:func:`pad_input` does that, the same way, for every adder layer (float or
integer), so that each accepts every padding form ``nn.Conv`` does.

Examples:
  >>> import jax.numpy as jnp
  >>> x = jnp.arange(4).reshape(1, 4, 1)
  >>> y, padding = pad_input(x, (3,), 'CIRCULAR', 1)
  >>> y[0, :, 0].tolist(), padding
  ([3, 0, 1, 2, 3, 0], 'VALID')
  >>> pad_input(x, (3,), 'same', 1)[1]  # zero paddings are the op's
  'SAME'
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from adderjax.ops import geometry
from adderjax.ops.geometry import PaddingLike

#: Padding names implemented by padding the input (then ``'VALID'``).
INPUT_PADDINGS = ('CIRCULAR', 'REFLECT', 'CAUSAL')


def pad_input(x: jax.Array, kernel_size: Sequence[int], padding: PaddingLike,
              kernel_dilation) -> tuple[jax.Array, PaddingLike]:
  """Pads ``x`` for an input padding; returns ``(x, padding for the op)``.

  ``'CIRCULAR'`` (wrap-around) and ``'REFLECT'`` pad each spatial dim by
  ``((k_d - 1) // 2, k_d // 2)`` with ``k_d`` the dilated kernel extent, and
  ``'CAUSAL'`` (1-D only) pads ``(k_d - 1, 0)`` with zeros, as
  ``flax.linen.Conv`` does; the op then runs ``'VALID'``. Any other padding
  (a string upper-cased) is returned unchanged with ``x``, for the op.

  Args:
    x: feature-last input ``(N, *spatial, C)`` of any dtype.
    kernel_size: the spatial kernel shape.
    padding: any padding form of the adder layers.
    kernel_dilation: an int or one int per spatial dim (``None``: 1).

  Returns:
    ``(x, padding)``: the input, padded for an input padding, and the
    padding the op takes.

  Raises:
    ValueError: ``'CAUSAL'`` with more than one spatial dim, or a bad
      ``kernel_dilation`` (for an input padding).

  Examples:
    >>> import jax.numpy as jnp
    >>> x = jnp.arange(1, 5).reshape(1, 4, 1)
    >>> y, padding = pad_input(x, (3,), 'CAUSAL', 1)
    >>> y[0, :, 0].tolist(), padding
    ([0, 0, 1, 2, 3, 4], 'VALID')
  """
  pad = padding.upper() if isinstance(padding, str) else padding
  if pad not in INPUT_PADDINGS:
    return x, pad
  nsp = len(kernel_size)
  dilation = geometry.as_int_tuple(kernel_dilation, nsp, 'kernel_dilation')
  if pad == 'CAUSAL':
    if nsp != 1:
      raise ValueError("padding='CAUSAL' is only defined for 1-D adder "
                       f'convolutions, got kernel_size={tuple(kernel_size)}.')
    return jnp.pad(x, [(0, 0), (dilation[0] * (kernel_size[0] - 1), 0),
                       (0, 0)]), 'VALID'
  dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
  widths = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
  return jnp.pad(x, widths,
                 mode={'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}[pad]), 'VALID'
