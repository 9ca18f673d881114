"""Activation recompute (``jax.checkpoint``) policies for adder networks.

A train step keeps, from the forward pass to the backward pass, whatever the
backward pass reads. In a CNN compiled by XLA the elementwise layers between
two convolutions (BatchNorm's normalisation, ReLU, residual additions) are
fused into the convolutions and recomputed there, so only the convolutions'
outputs stay in memory. An adder layer on an accelerator is a Mosaic or Triton
kernel, and XLA cannot fuse a producer into a kernel: without help it keeps
both the layer's input ``x`` (for the backward kernels) and the output of the
layer before (for BatchNorm's backward), two tensors per layer where the CNN
keeps one.

:data:`layer_outputs_saveable` is a ``jax.checkpoint`` policy that gives the
adder network the CNN's trade: it keeps the outputs of adder layers (every
output of :func:`adderjax.adder_conv` and :func:`adderjax.adder_dense` is
named :data:`~adderjax.ops.ADDER_OUTPUT`), of convolutions and matmuls, and
of reductions that shrink their operand at least ``min_reduction`` times
(BatchNorm's statistics, pooled features) and of cross-device sums;
everything else is recomputed in the backward pass from those. No layer
runs twice: the recomputed ops are elementwise. Gradients are the same (the
recomputation repeats the forward's ops in the same order).

Measured on TPU v5e (AOT through libtpu, ResNet-20, 128 images per chip, f32;
see ``docs/roofline.md``), the AddNN's train step holds 74 MB instead of 89 MB
and moves 2.65 GB instead of 2.77 GB.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> import adderjax
  >>> def loss(w, x):
  ...   y = jax.nn.relu(adderjax.adder_dense(x, w))
  ...   return jnp.sum(adderjax.adder_dense(y, w.T) ** 2)
  >>> loss_remat = jax.checkpoint(loss, policy=adderjax.layer_outputs_saveable)
  >>> w, x = jnp.ones((3, 3)), jnp.arange(6.).reshape(2, 3)
  >>> bool(jnp.allclose(jax.grad(loss)(w, x), jax.grad(loss_remat)(w, x)))
  True

  With Flax, ``flax.linen.remat(Module, policy=adderjax.layer_outputs_saveable)``
  or ``jax.checkpoint`` around the ``apply`` inside the loss.
"""

from __future__ import annotations

import dataclasses
import math

# The name is the op's (it tags its output); the policy reads it.
from adderjax.ops.adder import ADDER_OUTPUT

_LAYERS = frozenset({'conv_general_dilated', 'dot_general'})
_REDUCTIONS = frozenset({'reduce_sum', 'reduce_max', 'reduce_min', 'argmax',
                         'argmin'})
_COLLECTIVES = frozenset({'psum', 'psum_invariant', 'pmax', 'pmin'})


@dataclasses.dataclass(frozen=True)
class LayerOutputsSaveable:
  """``jax.checkpoint`` policy: save layer outputs, recompute the rest.

  Saves (returns ``True`` for) the outputs of adder layers (named
  :data:`~adderjax.ops.ADDER_OUTPUT`), of ``conv_general_dilated`` and
  ``dot_general`` (full-precision layers, the CNN twin's convolutions), of
  cross-device sums and maxima, and of reductions whose operand is at least
  ``min_reduction`` times their output; everything else is recomputed.

  Attributes:
    min_reduction: a reduction is kept when it shrinks its operand by at
      least this factor (BatchNorm's per-channel statistics shrink it by
      batch x height x width). Reductions that shrink less (e.g. partial sums
      inside a layer) are recomputed like elementwise ops.
  """
  min_reduction: int = 64

  def __post_init__(self):
    if (not isinstance(self.min_reduction, int)
        or isinstance(self.min_reduction, bool) or self.min_reduction < 1):
      raise ValueError(f'min_reduction must be a positive int, got '
                       f'{self.min_reduction!r}.')

  def __call__(self, prim, *avals, **params) -> bool:
    name = prim.name
    if name == 'name':
      return params.get('name') == ADDER_OUTPUT
    if name in _LAYERS or name in _COLLECTIVES:
      return True
    if name in _REDUCTIONS and avals and hasattr(avals[0], 'shape'):
      shape = avals[0].shape
      axes = params.get('axes', ())
      if isinstance(axes, int):
        axes = (axes,)
      kept = math.prod(d for i, d in enumerate(shape) if i not in axes)
      return math.prod(shape) >= self.min_reduction * max(kept, 1)
    return False


#: The default :class:`~adderjax.remat.LayerOutputsSaveable` policy.
layer_outputs_saveable = LayerOutputsSaveable()

__all__ = ['ADDER_OUTPUT', 'LayerOutputsSaveable', 'layer_outputs_saveable']
