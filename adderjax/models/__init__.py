"""The paper's model zoo: LeNet-5-BN, VGG-small, ResNet-20/32/18/50.

Each model is built in three kinds with the layer class injected, never copied
per kind: ``kind='cnn'`` (``nn.Conv`` / ``nn.Dense``),
``'adder'`` (:class:`adderjax.linen.AdderConv` / ``AdderDense``) and ``'bnn'``
(:class:`adderjax.bnn.BinaryConv` / ``BinaryDense``). As in the paper and its
official code, the first convolution and the classifier stay full precision,
BatchNorm follows every body layer, ResNet shortcuts that change shape are a
1x1 layer of the model's kind + BatchNorm, and the ResNets' classifier is a
1x1 layer over the pooled features followed by BatchNorm on the logits.

Why Flax Linen (not NNX) for the zoo: a Linen model is a stateless
description and its variables are a plain pytree (``{'params': ...,
'batch_stats': ...}``). That tree is what ``jax.jit`` in/out shardings and
``pmap`` replication take directly, what Orbax saves and restores without a
graph/state split, and what optax masks (e.g. the adder-kernel mask of the
adaptive learning rate) are written against; ``jax.eval_shape(model.init)``
gives the abstract tree for sharding plans and parameter counts without
allocating, and ``flax.linen.intercept_methods`` lets :func:`adderjax.count_ops`
see every layer call. Both layer APIs (:mod:`adderjax.linen`,
:mod:`adderjax.nnx`) keep working; an NNX user gets the zoo as NNX modules with
``create_model(..., api='nnx', rngs=nnx.Rngs(0))``: the same Linen model
inside ``flax.nnx.bridge.ToNNX`` (:class:`adderjax.models.nnx_zoo.ZooNNX`).

Interface: ``model = create_model(name, kind=..., num_classes=...)``, then
``model.init(key, x, train=False)`` and
``model.apply(variables, x, train=train, mutable=['batch_stats'] if train
else False)`` on NHWC float images (MNIST 28x28x1, CIFAR 32x32x3, ImageNet
224x224x3), giving float32 logits ``[N, num_classes]``.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from adderjax.models import create_model
  >>> model = create_model('lenet5_bn', kind='adder', num_classes=10)
  >>> x = jnp.zeros((2, 28, 28, 1))
  >>> init = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))
  >>> train_apply = jax.jit(lambda v, x: model.apply(
  ...     v, x, train=True, mutable=['batch_stats']))
  >>> variables = jax.eval_shape(init, x)  # abstract here; init(x) for real
  >>> sorted(variables)
  ['batch_stats', 'params']
  >>> logits, updates = jax.eval_shape(train_apply, variables, x)
  >>> logits.shape, sorted(updates)
  ((2, 10), ['batch_stats'])
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from collections.abc import Sequence

import flax.linen as nn
from flax import nnx
import jax.numpy as jnp

from adderjax import _checks
from adderjax.models.common import FirstConv
from adderjax.models.common import HE_NORMAL
from adderjax.models.common import KINDS
from adderjax.models.common import layers_for_kind
from adderjax.models.common import ModuleDef
from adderjax.models.common import ZooModel
from adderjax.models.lenet import LeNet5BN
from adderjax.models.nnx_zoo import ZooNNX
from adderjax.models.resnet import BasicBlock
from adderjax.models.resnet import Bottleneck
from adderjax.models.resnet import ResNet
from adderjax.models.resnet import ResNet18
from adderjax.models.resnet import ResNet20
from adderjax.models.resnet import ResNet32
from adderjax.models.resnet import ResNet50
from adderjax.models.vgg import VGGSmall
from adderjax.models.vit import ViT

_REGISTRY: dict[str, Any] = {
    'lenet5_bn': LeNet5BN,
    'vgg_small': VGGSmall,
    'resnet20': ResNet20,
    'resnet32': ResNet32,
    'resnet18': ResNet18,
    'resnet50': ResNet50,
    'vit_tiny': ViT,
}

#: Names accepted by :func:`create_model`.
MODEL_NAMES = tuple(_REGISTRY)

#: The input each model was designed for (height, width, channels).
INPUT_SHAPES = {
    'lenet5_bn': (28, 28, 1),
    'vgg_small': (32, 32, 3),
    'resnet20': (32, 32, 3),
    'resnet32': (32, 32, 3),
    'resnet18': (224, 224, 3),
    'resnet50': (224, 224, 3),
    'vit_tiny': (28, 28, 1),
}


def _model_class(builder) -> type:
  cls = builder
  while isinstance(cls, functools.partial):
    cls = cls.func
  return cls


#: Values of ``create_model(api=...)``.
APIS = ('linen', 'nnx')


def create_model(name: str, *, kind: str = 'adder', num_classes: int,
                 dtype: Any = jnp.float32, api: str = 'linen',
                 rngs: nnx.Rngs | None = None,
                 input_shape: Sequence[int] | None = None,
                 **overrides) -> nn.Module | ZooNNX:
  """Builds a model of the zoo in one of the three kinds, Linen or NNX.

  Args:
    name: one of :data:`MODEL_NAMES` (``'lenet5_bn'``, ``'vgg_small'``,
      ``'resnet20'``, ``'resnet32'``, ``'resnet18'``, ``'resnet50'``).
    kind: ``'cnn'``, ``'adder'`` or ``'bnn'``: the body layers (see
      :func:`layers_for_kind`). The stem and classifier are full precision
      for every kind.
    num_classes: number of logits.
    dtype: computation dtype (parameters are float32).
    api: ``'linen'`` (an unbound ``flax.linen.Module``) or ``'nnx'`` (a
      :class:`adderjax.models.nnx_zoo.ZooNNX`: the same Linen model inside
      ``flax.nnx.bridge.ToNNX``, initialised, computing what the Linen model
      computes with the same variables; in training mode until ``.eval()``).
    rngs: ``api='nnx'`` only, required there: the ``nnx.Rngs`` whose
      ``params`` stream initialises the model.
    input_shape: ``api='nnx'`` only: one image ``(height, width, channels)``
      to initialise on (default :data:`INPUT_SHAPES` of the model; the ViT's
      position embedding and LeNet-5's first dense layer fix the size).
    **overrides: other model fields, e.g. ``bn_momentum=0.9`` (Flax
      convention), ``grad='sign'`` / ``implementation='xla'`` (adder kind),
      ``stride_in_1x1=True`` (ResNet-50), ``conv=...`` to inject another layer,
      ``head='slac'`` for the skew-Laplace classifier
      (:class:`adderjax.slac.SLACHead`) in place of the linear one.

  Returns:
    An unbound ``flax.linen.Module`` (``api='linen'``) or an initialised
    :class:`adderjax.models.nnx_zoo.ZooNNX` (``api='nnx'``).

  Raises:
    ValueError: an unknown name, kind or override field, or a field value the
      model cannot run with (``num_classes`` not a positive int,
      ``bn_epsilon <= 0``, ``bn_momentum`` outside [0, 1), ``width < 1``, ...;
      see ``ZooModel.check_fields``). NumPy integers and floats are accepted
      as Python numbers. An unknown ``api``; ``rngs`` or ``input_shape``
      given with ``api='linen'``; ``rngs`` not an ``nnx.Rngs`` with
      ``api='nnx'``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from adderjax.models import create_model
    >>> model = create_model('resnet20', kind='cnn', num_classes=100)
    >>> shapes = jax.eval_shape(
    ...     lambda x: model.init(jax.random.key(0), x, train=False),
    ...     jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    >>> shapes['params']['fc']['kernel'].shape
    (64, 100)

    The same model for NNX (abstract here: ``nnx.eval_shape``):

    >>> from flax import nnx
    >>> net = nnx.eval_shape(lambda: create_model(
    ...     'resnet20', kind='cnn', num_classes=100, api='nnx',
    ...     rngs=nnx.Rngs(0)))
    >>> nnx.state(net, nnx.Param)['net']['fc']['kernel'].shape
    (64, 100)
  """
  _checks.choice('api', api, APIS)
  if api == 'linen':
    for arg, value in (('rngs', rngs), ('input_shape', input_shape)):
      if value is not None:
        raise ValueError(
            f"`{arg}` is only taken with api='nnx' (a Linen model is "
            f'initialised by model.init), got {arg}={value!r}.')
  elif not isinstance(rngs, nnx.Rngs):
    raise _checks.ArgumentTypeError(
        "api='nnx' needs `rngs`, an nnx.Rngs (e.g. nnx.Rngs(0)), got "
        f'rngs={_checks.describe(rngs)}.')
  _checks.choice('name', name, MODEL_NAMES)
  _checks.choice('kind', kind, KINDS)
  num_classes = _checks.positive_int('num_classes', num_classes)
  builder = _REGISTRY[name]
  fields = {f.name for f in dataclasses.fields(_model_class(builder))
            if f.name not in ('parent', 'name')}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f'unknown field(s) {unknown} for model {name!r}; valid '
                     f'fields: {sorted(fields)}.')
  conv, dense = layers_for_kind(kind)
  kwargs = dict(conv=conv, dense=dense, dtype=dtype)
  kwargs.update(overrides)
  model = builder(num_classes=num_classes, **kwargs)
  model.check_fields()
  if api == 'nnx':
    if input_shape is None:
      input_shape = INPUT_SHAPES[name]
    return ZooNNX(model, input_shape=input_shape, rngs=rngs)
  return model


__all__ = [
    'APIS', 'BasicBlock', 'Bottleneck', 'FirstConv', 'HE_NORMAL',
    'INPUT_SHAPES', 'KINDS', 'LeNet5BN', 'MODEL_NAMES', 'ModuleDef', 'ResNet',
    'ResNet18', 'ResNet20', 'ResNet32', 'ResNet50', 'VGGSmall', 'ViT',
    'ZooModel', 'ZooNNX', 'create_model', 'layers_for_kind',
]
