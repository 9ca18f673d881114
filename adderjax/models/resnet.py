"""ResNets of the paper: ResNet-20/32 (CIFAR) and ResNet-18/50 (ImageNet).

Topology as the official AdderNet code (``resnet20.py``, ``resnet50.py``):

* Stem, full precision: CIFAR 3x3/1 conv (16 channels); ImageNet 7x7/2 conv
  (64 channels, padding 3) and a 3x3/2 max pool (padding 1). BN + ReLU.
* Stages of basic blocks (two 3x3 layers) or bottlenecks (1x1, 3x3, 1x1 x4)
  of the model's kind, each layer followed by BatchNorm. A shortcut that
  changes shape is a 1x1 layer of the model's kind (stride 2 where the stage
  downsamples) + BatchNorm; other shortcuts are the identity.
* Head: global average pool, a full-precision 1x1 layer (a ``Dense`` over the
  pooled features, no bias unless ``classifier_bias``) and BatchNorm on the
  logits.

Padding is explicit and symmetric (``((1, 1), (1, 1))`` for 3x3) so stride-2
layers see the same windows as PyTorch's ``padding=1`` (``'SAME'`` would pad
``(0, 1)`` on even inputs).

The bottleneck downsamples in its 3x3 layer (``stride_in_1x1=False``, the
official code and torchvision, "ResNet v1.5": 4.09G MACs per 224x224 image);
``stride_in_1x1=True`` is the original ResNet-50 of He et al. (stride in the
first 1x1: 3.86G), whose count matches the paper's 3.9G.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adderjax import _checks
from adderjax.models.common import ModuleDef
from adderjax.models.common import ZooModel

_PAD3 = ((1, 1), (1, 1))
STEMS = ('cifar', 'imagenet')


class BasicBlock(nn.Module):
  """Two 3x3 layers with BatchNorm, plus a (projected) shortcut.

  Attributes:
    filters: output channels.
    conv: body conv class, bias-free (``ZooModel.body_conv()``).
    norm: BatchNorm class in the right mode (``ZooModel.norm(train)``).
    strides: stride of the first 3x3 layer and of the projection.
    stride_in_1x1: unused (bottleneck only); kept so blocks are swappable.
  """
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  stride_in_1x1: bool = False
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = (self.strides, self.strides)
    y = self.conv(self.filters, (3, 3), strides=s, padding=_PAD3,
                  name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.filters, (3, 3), padding=_PAD3, name='conv2')(y)
    y = self.norm(name='bn2')(y)
    return nn.relu(y + _shortcut(self, x, y.shape[-1], s))


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> 1x1 (x4 channels), BatchNorm after each, plus shortcut.

  Attributes:
    filters: width of the 1x1/3x3 layers (output is ``4 * filters``).
    conv: body conv class.
    norm: BatchNorm class.
    strides: downsampling stride.
    stride_in_1x1: put the stride in the first 1x1 layer (original ResNet)
      instead of the 3x3 one (official AdderNet code, torchvision).
  """
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  stride_in_1x1: bool = False
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = (self.strides, self.strides)
    s1, s3 = (s, (1, 1)) if self.stride_in_1x1 else ((1, 1), s)
    y = self.conv(self.filters, (1, 1), strides=s1, padding='VALID',
                  name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.filters, (3, 3), strides=s3, padding=_PAD3,
                  name='conv2')(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = self.conv(self.filters * self.expansion, (1, 1), padding='VALID',
                  name='conv3')(y)
    y = self.norm(name='bn3')(y)
    return nn.relu(y + _shortcut(self, x, y.shape[-1], s))


def _shortcut(block: nn.Module, x: jax.Array, features: int, strides):
  """Identity, or a 1x1 layer of the block's kind + BatchNorm (official)."""
  if strides == (1, 1) and x.shape[-1] == features:
    return x
  x = block.conv(features, (1, 1), strides=strides, padding='VALID',
                 name='downsample_conv')(x)
  return block.norm(name='downsample_bn')(x)


class ResNet(ZooModel):
  """ResNet with injected layers (CIFAR or ImageNet stem).

  Attributes:
    stage_sizes: blocks per stage.
    block_cls: :class:`BasicBlock` or :class:`Bottleneck`.
    width: channels of the stem and first stage (doubled at every stage).
    stem: ``'cifar'`` (3x3 conv) or ``'imagenet'`` (7x7/2 conv + max pool).
    stride_in_1x1: bottleneck stride placement (see module docstring).
    classifier_bias: give the classifier a bias (the official ResNet-50's
      ``fc`` is a 1x1 convolution with bias; ResNet-20's has none). Default
      ``False``: the bias is redundant before the logits' BatchNorm.
    remat_blocks: recompute residual blocks in the backward pass
      (``flax.linen.remat`` with nothing saved inside): a train step keeps
      only the blocks' inputs and runs each block's layers again, adder
      kernels included. ``True`` recomputes every block; a tuple of stage
      numbers, counted from 1 as in the parameter names (``layer1_0`` is in
      stage 1), recomputes the blocks of those stages only, e.g. ``(1,)``
      for the first stage, whose activations are the largest. Memory for
      time: on TPU v5e a ResNet-20 AddNN step at 128 images per chip holds
      48 MB instead of 89 MB with every block recomputed, and runs every
      adder forward twice (see ``docs/roofline.md``). Same parameters and
      gradients. For the cheaper recompute of elementwise ops only, see
      :data:`adderjax.layer_outputs_saveable`.
    (others): see :class:`adderjax.models.common.ZooModel`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from adderjax.models import ResNet, BasicBlock
    >>> model = ResNet(num_classes=10, stage_sizes=(1, 1), width=4,
    ...                block_cls=BasicBlock)
    >>> x = jnp.zeros((2, 8, 8, 3))
    >>> variables = jax.eval_shape(
    ...     lambda x: model.init(jax.random.key(0), x, train=False), x)
    >>> sorted(variables['params'])
    ['bn1', 'conv1', 'fc', 'fc_bn', 'layer1_0', 'layer2_0']
    >>> logits, state = jax.eval_shape(lambda v, x: model.apply(
    ...     v, x, train=True, mutable=['batch_stats']), variables, x)
    >>> logits.shape
    (2, 10)
  """
  stage_sizes: Sequence[int] = (3, 3, 3)
  block_cls: ModuleDef = BasicBlock
  width: int = 16
  stem: str = 'cifar'
  stride_in_1x1: bool = False
  classifier_bias: bool = False
  remat_blocks: bool | tuple[int, ...] = False

  def check_fields(self) -> None:
    super().check_fields()
    _checks.choice('stem', self.stem, STEMS)
    _checks.shape('stage_sizes', self.stage_sizes,
                  hint='blocks per stage, each at least 1')
    _checks.positive_int('width', self.width)
    if not isinstance(self.classifier_bias, (bool, np.bool_)):
      raise _checks.ArgumentTypeError(
          f'`classifier_bias` must be a bool, got '
          f'{_checks.describe(self.classifier_bias)}.')
    self.remat_stages()  # checks remat_blocks

  def remat_stages(self) -> frozenset[int]:
    """The stages (counted from 1) whose blocks ``remat_blocks`` recomputes."""
    value, stages = self.remat_blocks, len(self.stage_sizes)
    if isinstance(value, (bool, np.bool_)):
      return frozenset(range(1, stages + 1) if value else ())
    if isinstance(value, (tuple, list)) and all(
        isinstance(i, (int, np.integer)) and not isinstance(i, bool)
        for i in value):
      bad = [int(i) for i in value if not 1 <= i <= stages]
      if bad:
        raise ValueError(
            f'`remat_blocks` {tuple(value)!r}: stage(s) {bad} out of range; '
            f'this ResNet has stages 1..{stages} (counted from 1, as in '
            f'the parameter names layer1_0, ...).')
      return frozenset(int(i) for i in value)
    raise _checks.ArgumentTypeError(
        f'`remat_blocks` must be a bool or a tuple of stage numbers '
        f'(e.g. (1,)), got {_checks.describe(value)}.')

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = jnp.asarray(x)
    self.check_input(x, 'ResNet')
    norm = self.norm(train)
    conv = self.body_conv()
    remat_stages = self.remat_stages()
    recomputed = nn.remat(self.block_cls) if remat_stages else None

    if self.stem == 'cifar':
      x = self.first_conv(self.width, (3, 3), padding=_PAD3, use_bias=False,
                          dtype=self.dtype, name='conv1')(x)
      x = nn.relu(norm(name='bn1')(x))
    else:
      x = self.first_conv(self.width, (7, 7), strides=(2, 2),
                          padding=((3, 3), (3, 3)), use_bias=False,
                          dtype=self.dtype, name='conv1')(x)
      x = nn.relu(norm(name='bn1')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_PAD3)
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        block_cls = recomputed if i + 1 in remat_stages else self.block_cls
        x = block_cls(
            filters=self.width * 2**i, conv=conv, norm=norm,
            strides=2 if i > 0 and j == 0 else 1,
            stride_in_1x1=self.stride_in_1x1, name=f'layer{i + 1}_{j}')(x)
    x = jnp.mean(x, axis=(1, 2))
    if self.head == 'slac':  # log-densities: no BatchNorm on them
      return self.slac_head()(name='fc')(x)
    x = self.classifier(self.num_classes, use_bias=self.classifier_bias,
                        dtype=self.dtype, name='fc')(x)
    x = norm(name='fc_bn')(x)
    return jnp.asarray(x, jnp.float32)


ResNet20 = functools.partial(ResNet, stage_sizes=(3, 3, 3),
                             block_cls=BasicBlock, width=16, stem='cifar')
ResNet32 = functools.partial(ResNet, stage_sizes=(5, 5, 5),
                             block_cls=BasicBlock, width=16, stem='cifar')
# ImageNet: a full-covariance SLAC head would hold 1000 d x d matrices
# (d = 512, 2048), so theirs is diagonal.
ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2),
                             block_cls=BasicBlock, width=64, stem='imagenet',
                             slac_covariance='diagonal')
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3),
                             block_cls=Bottleneck, width=64, stem='imagenet',
                             slac_covariance='diagonal')
# A one-block CIFAR ResNet for fast tests.
_ResNet1 = functools.partial(ResNet, stage_sizes=(1,), block_cls=BasicBlock,
                             width=8, stem='cifar')
