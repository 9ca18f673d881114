"""A LeNet++-style network with a 2-D feature layer (the paper's Figure 1).

LeNet++ (Wen et al., ECCV 2016) is a small MNIST convolutional network whose
last hidden layer has two units, so that the features the classifier sees can
be drawn in the plane. The AdderNet paper (Figure 1) trains it as a CNN and as
an AdderNet: CNN features separate by angle (the classifier is an inner
product), AdderNet features cluster around class centres (the classifier is
a negative l1 distance to each class template).

This version is narrower than Wen et al.'s (three stages of one convolution,
widths 8/16/32 by default, about 0.6M multiply-adds per image, the cost of
LeNet-5-BN) so that it trains in minutes on two CPU cores:

========================  =================================  ==============
layer                     cnn                                adder
========================  =================================  ==============
stem 5x5, widths[0]       ``nn.Conv`` + BN + ReLU + pool     same (kept)
3x3, widths[1:] (each)    ``nn.Conv`` + BN + ReLU + pool     ``AdderConv``
features (``feature_dim``) ``nn.Dense`` + BN                 ``AdderDense``
classifier                ``nn.Dense`` (with bias)           ``AdderDense``
                                                             + BN (logits)
========================  =================================  ==============

The stem stays a multiplication layer in both kinds (as in every model of the
zoo). The AdderNet's classifier is an adder layer, unlike the zoo's: it is
what makes the l1 geometry of Figure 1 visible (logit ``c`` is
``-||f - w_c||_1``, rescaled by a BatchNorm as the official code's
classifiers). The 2-D features (after their BatchNorm, no activation) are
stored with ``sow`` in the ``'intermediates'`` collection under
``'features'``.

Pooling is 2x2 max pooling written as a reshape and a max (odd sizes are
cropped, as ``VALID`` pooling does): on XLA:CPU its gradient is about 3.5x
faster than ``nn.max_pool``'s ``select_and_scatter`` (measured here at
batch 256, 28x28x6).

Examples:
  >>> import jax, jax.numpy as jnp
  >>> model = create_lenetpp(kind='adder', num_classes=10)
  >>> x = jnp.zeros((3, 28, 28, 1))
  >>> variables = model.init(jax.random.key(0), x, train=False)
  >>> logits, inter = model.apply(variables, x, train=False,
  ...                             mutable=['intermediates'])
  >>> logits.shape, inter['intermediates']['features'][0].shape
  ((3, 10), (3, 2))
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from adderjax import linen as adder_linen

KINDS = ('cnn', 'adder')


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling with stride 2 on NHWC input (odd sizes cropped).

  Args:
    x: ``[N, H, W, C]``.

  Returns:
    ``[N, H // 2, W // 2, C]``.

  Examples:
    >>> import jax.numpy as jnp
    >>> x = jnp.arange(16.).reshape(1, 4, 4, 1)
    >>> max_pool_2x2(x)[0, :, :, 0].tolist()
    [[5.0, 7.0], [13.0, 15.0]]
  """
  n, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2, :]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class LeNetPP(nn.Module):
  """LeNet++-style network with a ``feature_dim``-D feature layer.

  Attributes:
    num_classes: number of logits.
    kind: ``'cnn'`` or ``'adder'`` (see the module docstring).
    widths: channels of the stem and of each following 3x3 stage.
    feature_dim: width of the feature layer (2 for Figure 1).
    dtype: computation dtype.
    bn_momentum: BatchNorm running-average momentum (Flax convention).
    grad: adder gradient mode (``None``: the layer default).
    implementation: adder backend (``None``: the layer default).
  """
  num_classes: int = 10
  kind: str = 'adder'
  widths: Sequence[int] = (8, 16, 32)
  feature_dim: int = 2
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  grad: str | None = None
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = jnp.asarray(x, self.dtype)
    if x.ndim != 4:
      raise ValueError(f'LeNetPP expects NHWC images, got shape {x.shape}.')
    # Two-pass variance, as in the zoo (adderjax.models.common): adder
    # outputs have a large mean that E[y^2] - E[y]^2 cancels in float32.
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=1e-5,
                             dtype=self.dtype, use_fast_variance=False)
    adder_kwargs = {}
    if self.grad is not None:
      adder_kwargs['grad'] = self.grad
    if self.implementation is not None:
      adder_kwargs['implementation'] = self.implementation
    if self.kind == 'adder':
      conv = functools.partial(adder_linen.AdderConv, **adder_kwargs)
      dense = functools.partial(adder_linen.AdderDense, **adder_kwargs)
    else:
      conv, dense = nn.Conv, nn.Dense

    x = nn.Conv(self.widths[0], (5, 5), padding=2, use_bias=False,
                dtype=self.dtype, name='stem')(x)
    x = max_pool_2x2(nn.relu(norm(name='stem_bn')(x)))
    for i, width in enumerate(self.widths[1:]):
      x = conv(width, (3, 3), padding=1, use_bias=False, dtype=self.dtype,
               name=f'conv{i + 1}')(x)
      x = max_pool_2x2(nn.relu(norm(name=f'conv{i + 1}_bn')(x)))
    x = x.reshape((x.shape[0], -1))
    features = dense(self.feature_dim, use_bias=False, dtype=self.dtype,
                     name='feature')(x)
    features = norm(name='feature_bn')(features)
    self.sow('intermediates', 'features', features)
    if self.kind == 'adder':
      logits = dense(self.num_classes, use_bias=False, dtype=self.dtype,
                     name='classifier')(features)
      logits = norm(name='classifier_bn')(logits)
    else:
      logits = nn.Dense(self.num_classes, dtype=self.dtype,
                        name='classifier')(features)
    return jnp.asarray(logits, jnp.float32)


def create_lenetpp(*, kind: str = 'adder', num_classes: int = 10,
                   dtype: Any = jnp.float32, bn_momentum: float = 0.9,
                   grad: str | None = None,
                   implementation: str | None = None,
                   widths: Sequence[int] = (8, 16, 32),
                   feature_dim: int = 2) -> LeNetPP:
  """Builds :class:`LeNetPP`; the factory signature of ``experiments.train``.

  Use it from a config as
  ``config.model.name = 'experiments.reproduce_lib.lenetpp:create_lenetpp'``.

  Args:
    kind: ``'cnn'`` or ``'adder'``.
    num_classes: number of logits.
    dtype: computation dtype.
    bn_momentum: BatchNorm momentum (Flax convention).
    grad: adder gradient mode (adder kind only).
    implementation: adder backend (adder kind only).
    widths: channels of the stem and the 3x3 stages (at least one stage).
    feature_dim: width of the feature layer.

  Returns:
    An unbound :class:`LeNetPP`.

  Raises:
    ValueError: an unknown kind, ``grad``/``implementation`` with the CNN
      kind, or non-positive sizes.

  Examples:
    >>> create_lenetpp(kind='cnn').feature_dim
    2
    >>> create_lenetpp(kind='bnn')
    Traceback (most recent call last):
    ...
    ValueError: kind must be one of ('cnn', 'adder'), got 'bnn'.
  """
  if kind not in KINDS:
    raise ValueError(f'kind must be one of {KINDS}, got {kind!r}.')
  if kind == 'cnn' and (grad is not None or implementation is not None):
    raise ValueError(f'grad={grad!r} / implementation={implementation!r} '
                     "apply to adder layers only; kind is 'cnn'.")
  widths = tuple(int(w) for w in widths)
  if len(widths) < 2 or min(widths) < 1:
    raise ValueError(f'widths must hold at least two positive ints (stem and '
                     f'one stage), got {widths!r}.')
  if feature_dim < 1 or num_classes < 1:
    raise ValueError(f'feature_dim and num_classes must be positive, got '
                     f'{feature_dim!r} and {num_classes!r}.')
  return LeNetPP(num_classes=num_classes, kind=kind, widths=widths,
                 feature_dim=feature_dim, dtype=dtype,
                 bn_momentum=bn_momentum, grad=grad,
                 implementation=implementation)
