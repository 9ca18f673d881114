"""VGG-small, the CIFAR model of the BNN / LQ-Nets literature used in Table 1.

Topology (32x32x3 input; every conv 3x3, stride 1, padding 1, no bias):

=======  =====================  =============  ===========
layer    output                 kind           MACs
=======  =====================  =============  ===========
conv1    32x32x128              full precision   3,538,944
conv2    32x32x128, max pool    model kind     150,994,944
conv3    16x16x256              model kind      75,497,472
conv4    16x16x256, max pool    model kind     150,994,944
conv5    8x8x512                model kind      75,497,472
conv6    8x8x512, max pool      model kind     150,994,944
fc       4*4*512 -> classes     full precision      81,920
=======  =====================  =============  ===========

Each conv is followed by BatchNorm and ReLU (then the 2x2 max pool where
listed). Total 607,600,640 MACs (0.61G) per 32x32 image. The paper's Table 1
lists 0.65G; no VGG-small of the literature (this one, or with BinaryConnect's
two 1024-wide hidden fully connected layers: 0.62G) gives 0.65G, and the paper
does not give its derivation.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from adderjax import _checks
from adderjax.models.common import ZooModel

_PAD = ((1, 1), (1, 1))


class VGGSmall(ZooModel):
  """VGG-small: 2x128, pool, 2x256, pool, 2x512, pool, fc.

  Attributes:
    widths: channels of the three conv pairs.
    slac_covariance: ``'diagonal'`` here (d = 8192); see
      :class:`adderjax.models.common.ZooModel`.
    (others): see :class:`adderjax.models.common.ZooModel`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from adderjax.models import VGGSmall
    >>> model = VGGSmall(num_classes=10)
    >>> x = jnp.zeros((2, 32, 32, 3))
    >>> variables = jax.eval_shape(
    ...     lambda x: model.init(jax.random.key(0), x, train=False), x)
    >>> variables['params']['fc']['kernel'].shape
    (8192, 10)
    >>> jax.eval_shape(lambda v, x: model.apply(v, x, train=False),
    ...                variables, x).shape
    (2, 10)
  """
  widths: tuple[int, int, int] = (128, 256, 512)
  # The flattened 4x4x512 features (d = 8192): a full d x d Sigma per class
  # would not fit.
  slac_covariance: str = 'diagonal'

  def check_fields(self) -> None:
    super().check_fields()
    widths = _checks.shape('widths', self.widths)
    if len(widths) != 3:
      raise ValueError(f'`widths` must have 3 entries (one per conv pair), '
                       f'got {self.widths!r}.')

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = jnp.asarray(x)
    self.check_input(x, 'VGGSmall')
    norm = self.norm(train)
    conv = self.body_conv()

    x = self.first_conv(self.widths[0], (3, 3), padding=_PAD, use_bias=False,
                        dtype=self.dtype, name='conv1')(x)
    x = nn.relu(norm(name='bn1')(x))
    index = 2
    for stage, width in enumerate(self.widths):
      for _ in range(1 if stage == 0 else 2):
        x = conv(width, (3, 3), padding=_PAD, name=f'conv{index}')(x)
        x = nn.relu(norm(name=f'bn{index}')(x))
        index += 1
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    if self.head == 'slac':
      x = self.slac_head()(name='fc')(x)
    else:
      x = self.classifier(self.num_classes, dtype=self.dtype, name='fc')(x)
    return jnp.asarray(x, jnp.float32)
