"""LeNet-5-BN, the paper's MNIST model (section 4.1, Figures 2 and 4).

Topology (classic LeNet-5 sizes, BatchNorm after every hidden layer):

=========  ==========================================  ================  ======
layer      shape (28x28x1 input)                       kind              MACs
=========  ==========================================  ================  ======
conv1      5x5, 6, SAME (pad 2): 28x28x6               full precision    117600
pool1      2x2 max, stride 2: 14x14x6
conv2      5x5, 16, VALID: 10x10x16                    model kind        240000
pool2      2x2 max, stride 2: 5x5x16 -> 400
fc1        400 -> 120                                  model kind         48000
fc2        120 -> 84                                   model kind         10080
fc3        84 -> num_classes (with bias)               full precision       840
=========  ==========================================  ================  ======

Every hidden layer is followed by BatchNorm and ReLU. Total 416,520 MACs per
28x28 image (plus 10 bias adds), the variant closest to the paper's "about
435K": the other classic variant (unpadded conv1 on 28x28, i.e. LeNet-5
without its 32x32 input border) has 281,640. The paper does not say how it
counted; the 4% gap is of the size of the elementwise layers
(BatchNorm / ReLU / pooling: about 6.5K outputs each), which no convention here
counts.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from adderjax import _checks
from adderjax.models.common import ZooModel

POOLS = ('max', 'avg')


class LeNet5BN(ZooModel):
  """LeNet-5 with BatchNorm (the paper's MNIST model).

  Attributes:
    pool: ``'max'`` or ``'avg'`` 2x2 pooling.
    (others): see :class:`adderjax.models.common.ZooModel`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from adderjax.models import LeNet5BN
    >>> model = LeNet5BN(num_classes=10)  # adder layers by default
    >>> x = jnp.zeros((2, 28, 28, 1))
    >>> variables = jax.eval_shape(  # abstract: shapes only, nothing computed
    ...     lambda x: model.init(jax.random.key(0), x, train=False), x)
    >>> variables['params']['conv2']['kernel'].shape
    (5, 5, 6, 16)
    >>> jax.eval_shape(lambda v, x: model.apply(v, x, train=False),
    ...                variables, x).shape
    (2, 10)
  """
  pool: str = 'max'

  def check_fields(self) -> None:
    super().check_fields()
    _checks.choice('pool', self.pool, POOLS)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = jnp.asarray(x)
    self.check_input(x, 'LeNet5BN')
    pool = nn.max_pool if self.pool == 'max' else nn.avg_pool
    norm = self.norm(train)
    conv = self.body_conv()
    dense = self.body_dense()

    x = self.first_conv(6, (5, 5), padding=((2, 2), (2, 2)), use_bias=False,
                        dtype=self.dtype, name='conv1')(x)
    x = nn.relu(norm(name='bn1')(x))
    x = pool(x, (2, 2), strides=(2, 2))
    x = conv(16, (5, 5), padding='VALID', name='conv2')(x)
    x = nn.relu(norm(name='bn2')(x))
    x = pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = dense(120, name='fc1')(x)
    x = nn.relu(norm(name='bn3')(x))
    x = dense(84, name='fc2')(x)
    x = nn.relu(norm(name='bn4')(x))
    if self.head == 'slac':
      x = self.slac_head()(name='fc3')(x)
    else:
      x = self.classifier(self.num_classes, dtype=self.dtype, name='fc3')(x)
    return jnp.asarray(x, jnp.float32)
