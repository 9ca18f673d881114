"""The backend protocol of the adder ops.

A backend computes the three reductions of an adder convolution on the
convolution's own arrays: feature-last input ``x`` ``(N, *spatial, C_in)``,
flax kernel ``(*kernel_size, C_in / G, C_out)``, output cotangent ``gy``
``(N, *out_spatial, C_out)``, and the :class:`adderjax.ops.geometry.ConvGeometry`
of the layer. Each returns its result in the accumulation dtype (float32, or
float64 for float64 inputs); :mod:`adderjax.ops.adder` casts back. Backends
never see an empty batch (the op answers those itself).

The backends take the shape of tokamax's ops: :class:`Backend` here is the
abstract interface (what the registry, :mod:`adderjax.ops.backends`, accepts
and what ``implementation=`` names), and the base *implementation* is the XLA
backend, :class:`adderjax.ops.xla_backend.XlaBackend`, whose every method
does the XLA computation; the Pallas backends subclass it and override only
what their kernels specialise. The interface stays apart from that base
because not every backend is a specialisation of XLA: one written on another
layout (:class:`PatchBackend`, such as the tests' oracle) implements all
three reductions, must not inherit an XLA computation that it forgot to
override (here a missing method raises ``NotImplementedError``), and need not
import the XLA kernels; and this module, which the registry and the XLA
backend both import, stays free of them.

:class:`PatchBackend` adapts a backend written on the canonical patch layout
(``P[G, K, M]``, ``W[G, K, T]``, ``[G, T, M]``) to this protocol.

Examples:
  >>> import jax.numpy as jnp
  >>> from adderjax.ops import geometry, protocol, reference
  >>> class Naive(protocol.PatchBackend):
  ...   name = 'naive'
  ...   def l1_forward(self, p, w, *, precision=None):
  ...     return -jnp.sum(jnp.abs(p[:, :, None, :] - w[:, :, :, None]), 1)
  >>> geo = geometry.make_geometry((1, 3, 3, 1), (2, 2, 1, 1), 1, 'VALID',
  ...                              1, 1)
  >>> Naive().forward(jnp.ones((1, 3, 3, 1)), jnp.zeros((2, 2, 1, 1)),
  ...                 geo).shape
  (1, 2, 2, 1)
"""

from __future__ import annotations

import jax

from adderjax.ops import geometry
from adderjax.ops import reference


class Backend:
  """The interface of a conv-level adder backend (register an instance).

  A backend that specialises XLA subclasses
  :class:`adderjax.ops.xla_backend.XlaBackend` instead, which implements
  every method; a backend on another layout subclasses this (or
  :class:`PatchBackend`) and implements all three reductions.

  Attributes:
    name: the registry name, what ``implementation=`` selects.
    explicit_only: ``implementation=None`` never picks it (e.g. Pallas
      interpret mode, which runs anywhere but slowly).
    symbolic_shapes: it takes a geometry with symbolic sizes (``jax.export``
      shape polymorphism); when ``False``, naming it for such a layer is a
      ``ValueError`` that gives :attr:`symbolic_reason`.
    symbolic_reason: why it does not take symbolic sizes.
  """

  name: str = ''
  explicit_only: bool = False
  symbolic_shapes: bool = True
  symbolic_reason: str = ''

  def supported_on(self, platform: str) -> bool:  # pylint: disable=unused-argument
    """Whether this backend can run on ``platform`` ('cpu', 'gpu', 'tpu')."""
    return True

  def unsupported_reason(self, platform: str) -> str:
    return f'{self.name} does not run on {platform}'

  def forward(self, x: jax.Array, kernel: jax.Array,
              geo: geometry.ConvGeometry, *, precision=None) -> jax.Array:
    """``-sum |patch - filter|``: ``(N, *out_spatial, C_out)``."""
    raise NotImplementedError(f'{type(self).__name__}.forward')

  def input_grad(self, x: jax.Array, kernel: jax.Array, gy: jax.Array,
                 geo: geometry.ConvGeometry, mode: str, *,
                 precision=None) -> jax.Array:
    """Input gradient ``(N, *spatial, C_in)`` for grad ``mode``."""
    raise NotImplementedError(f'{type(self).__name__}.input_grad')

  def weight_grad(self, x: jax.Array, kernel: jax.Array, gy: jax.Array,
                  geo: geometry.ConvGeometry, mode: str, *,
                  precision=None) -> jax.Array:
    """Kernel gradient in the flax kernel layout for grad ``mode``."""
    raise NotImplementedError(f'{type(self).__name__}.weight_grad')


class PatchBackend(Backend):
  """A backend written on the canonical patch layout.

  Subclasses implement :meth:`l1_forward` and may override
  :meth:`l1_input_grad` and :meth:`l1_weight_grad` (the defaults are the
  reference formulas of :mod:`adderjax.ops.reference`). The conv-level
  methods build the patch matrix (im2col), call them, and sum the patch
  gradient back onto the input (col2im) in the accumulation dtype.
  """

  def l1_forward(self, p, w, *, precision=None):
    """``[G,K,M] x [G,K,T] -> [G,T,M]``: ``-sum_k |P - W|``."""
    raise NotImplementedError(f'{type(self).__name__}.l1_forward')

  def l1_input_grad(self, p, w, gy, mode, *, precision=None):
    """Patch gradient ``[G,K,M]`` for grad ``mode``."""
    return reference.l1_input_grad(p, w, gy, mode, precision=precision)

  def l1_weight_grad(self, p, w, gy, mode, *, precision=None):
    """Kernel gradient ``[G,K,T]`` for grad ``mode``."""
    return reference.l1_weight_grad(p, w, gy, mode, precision=precision)

  def forward(self, x, kernel, geo, *, precision=None):
    p = geometry.extract_patches(x, geo)
    w = geometry.kernel_to_canonical(kernel, geo)
    y = self.l1_forward(p, w, precision=precision)
    return geometry.output_from_canonical(y, geo)

  def input_grad(self, x, kernel, gy, geo, mode, *, precision=None):
    p = geometry.extract_patches(x, geo)
    w = geometry.kernel_to_canonical(kernel, geo)
    gyc = geometry.output_to_canonical(gy, geo)
    dp = self.l1_input_grad(p, w, gyc, mode, precision=precision)
    return reference.col2im(dp, geo, x.shape)

  def weight_grad(self, x, kernel, gy, geo, mode, *, precision=None):
    p = geometry.extract_patches(x, geo)
    w = geometry.kernel_to_canonical(kernel, geo)
    gyc = geometry.output_to_canonical(gy, geo)
    dw = self.l1_weight_grad(p, w, gyc, mode, precision=precision)
    return geometry.kernel_from_canonical(dw, geo)
