"""Pieces shared by the model zoo: layer kinds, the base module, BatchNorm.

A model of the zoo never names its layer classes: the full-precision stem
(``first_conv``), the full-precision classifier (``classifier``) and the body
layers (``conv``, ``dense``) are fields, filled by :func:`layers_for_kind` for
``kind='cnn' | 'adder' | 'bnn'`` (STYLE.md convention 9).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from adderjax import _checks
from adderjax import bnn
from adderjax import linen as adder_linen
from adderjax.ops import backends
from adderjax.ops import geometry
from adderjax import slac

ModuleDef = Any

#: Layer kinds of :func:`adderjax.models.create_model`.
KINDS = ('cnn', 'adder', 'bnn')

#: Classifier heads of the zoo (the ``head`` field): the paper's linear layer
#: or the skew-Laplace classifier (:class:`adderjax.slac.SLACHead`).
HEADS = ('dense', 'slac')

#: He (Kaiming) normal init, fan-out, for full-precision convolutions (the
#: official ResNet-50 code initialises its ``nn.Conv2d`` layers this way).
HE_NORMAL = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

#: The stem of every model: a full-precision convolution, He-initialised.
FirstConv = functools.partial(nn.Conv, kernel_init=HE_NORMAL)

#: Body layers of the BNN kind: XNOR-Net per-channel weight scale, DoReFa-Net
#: 1-bit activations ({0, 1}). Every binary layer of the zoo reads a ReLU
#: output (conv -> BN -> ReLU topology shared by all kinds), on which ``sign``
#: would be constant +1; DoReFa-Net's ``round(clip(x, 0, 1))`` is the 1-bit
#: quantiser made for non-negative activations.
BinaryConvDoReFa = functools.partial(
    bnn.BinaryConv, input_binarization='dorefa', weight_scale='channel',
    kernel_init=HE_NORMAL)
BinaryDenseDoReFa = functools.partial(
    bnn.BinaryDense, input_binarization='dorefa', weight_scale='channel')


def layers_for_kind(kind: str) -> tuple[ModuleDef, ModuleDef]:
  """The body ``(conv, dense)`` layer classes of a model kind.

  Args:
    kind: ``'cnn'`` (``nn.Conv`` He-initialised, ``nn.Dense``), ``'adder'``
      (:class:`adderjax.linen.AdderConv`, :class:`adderjax.linen.AdderDense`)
      or ``'bnn'`` (:class:`adderjax.bnn.BinaryConv` /
      :class:`adderjax.bnn.BinaryDense` with DoReFa-Net 1-bit activations and
      per-channel weight scales).

  Returns:
    ``(conv, dense)``: classes (or ``functools.partial`` of classes) taking
    the ``nn.Conv`` / ``nn.Dense`` arguments.

  Raises:
    ValueError: an unknown ``kind``.

  Examples:
    >>> from adderjax.models import layers_for_kind
    >>> layers_for_kind('adder')[0].__name__
    'AdderConv'
  """
  if kind == 'cnn':
    return FirstConv, nn.Dense
  if kind == 'adder':
    return adder_linen.AdderConv, adder_linen.AdderDense
  if kind == 'bnn':
    return BinaryConvDoReFa, BinaryDenseDoReFa
  raise ValueError(f'kind must be one of {KINDS}, got {kind!r}.')


def _layer_name(layer: ModuleDef) -> str:
  cls = layer
  while isinstance(cls, functools.partial):
    cls = cls.func
  return getattr(cls, '__name__', repr(cls))


def _field_names(layer: ModuleDef) -> set[str]:
  cls = layer
  while isinstance(cls, functools.partial):
    cls = cls.func
  if dataclasses.is_dataclass(cls):
    return {f.name for f in dataclasses.fields(cls)}
  return set()


class ZooModel(nn.Module):
  """Fields shared by every model of the zoo.

  Attributes:
    num_classes: number of logits.
    conv: body convolution class (``nn.Conv`` signature); adder, binary or
      plain, see :func:`layers_for_kind`.
    dense: body fully connected class (``nn.Dense`` signature); used by the
      models with hidden fully connected layers (LeNet-5-BN).
    first_conv: the stem convolution, kept full precision.
    classifier: the last (classifier) layer, kept full precision.
    dtype: computation dtype of every layer (parameters stay float32).
    bn_momentum: BatchNorm running-average momentum, Flax convention
      (``running = momentum * running + (1 - momentum) * batch``):
      PyTorch's ``momentum=0.1`` is Flax's ``0.9``.
    bn_epsilon: BatchNorm epsilon (PyTorch's default 1e-5).
    bn_axis_name: ``axis_name`` for cross-device BatchNorm statistics under
      ``pmap`` / ``shard_map`` (``None``: none; under ``jit`` with shardings
      the statistics are global already).
    grad: gradient mode passed to the body layers (``'full_precision'``,
      ``'sign'``, ``'unclipped'``); ``None`` keeps the layer default. Only
      layers with a ``grad`` field (adder layers) accept it.
    implementation: adder backend passed to the body layers (``None``: the
      layer default, i.e. the fastest available).
    head: the classifier: ``'dense'`` (the ``classifier`` layer, the
      paper's) or ``'slac'``: :class:`adderjax.slac.SLACHead` on the same
      features, under the same name, in place of the classifier (and of the
      ResNets' BatchNorm on the logits); its logits are class
      log-densities + log(1/K).
    slac_covariance: ``Sigma`` of the SLAC head, ``'full'`` or
      ``'diagonal'`` (used with ``head='slac'`` only). Full for LeNet-5-BN
      and the CIFAR ResNets (d = 84, 64), diagonal for VGG-small and the
      ImageNet ResNets (d = 8192, 512, 2048).
  """
  num_classes: int
  conv: ModuleDef = adder_linen.AdderConv
  dense: ModuleDef = adder_linen.AdderDense
  first_conv: ModuleDef = FirstConv
  classifier: ModuleDef = nn.Dense
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  bn_axis_name: str | None = None
  grad: str | None = None
  implementation: str | None = None
  head: str = 'dense'
  slac_covariance: str = 'full'

  def _layer_kwargs(self, layer: ModuleDef) -> dict[str, Any]:
    names = _field_names(layer)
    kwargs = {}
    for key in ('grad', 'implementation'):
      value = getattr(self, key)
      if value is None:
        continue
      if key not in names:
        raise ValueError(
            f'`{key}`={value!r} is only meaningful for adder layers, but the '
            f'body layer {_layer_name(layer)} has no {key!r} field (kind is '
            'not "adder").')
      kwargs[key] = value
    return kwargs

  def body_conv(self) -> ModuleDef:
    """The body convolution: no bias (BatchNorm follows), model dtype."""
    return functools.partial(self.conv, use_bias=False, dtype=self.dtype,
                             **self._layer_kwargs(self.conv))

  def body_dense(self) -> ModuleDef:
    """The body fully connected layer: no bias (BatchNorm follows)."""
    return functools.partial(self.dense, use_bias=False, dtype=self.dtype,
                             **self._layer_kwargs(self.dense))

  def slac_head(self) -> ModuleDef:
    """The SLAC classifier head of ``head='slac'`` (call with ``name=``)."""
    return functools.partial(slac.SLACHead, self.num_classes,
                             covariance=self.slac_covariance)

  def norm(self, train: bool) -> ModuleDef:
    """BatchNorm in training (batch statistics) or eval (running) mode."""
    self._check_batch_norm()
    # Two-pass variance: an adder layer's outputs -sum|x - w| have a mean
    # that grows with the kernel norm (hundreds of standard deviations late
    # in training), and flax's default E[y^2] - E[y]^2 then cancels in
    # float32: the variance turns to noise or zero, and training collapses
    # (a 50-epoch LeNet-5-BN run fell from 99.2 % to 12 % at epoch 43).
    return functools.partial(
        nn.BatchNorm, use_running_average=not train,
        momentum=self.bn_momentum, epsilon=self.bn_epsilon,
        dtype=self.dtype, axis_name=self.bn_axis_name,
        use_fast_variance=False)

  def _check_batch_norm(self) -> None:
    _checks.finite_number(
        'bn_momentum', self.bn_momentum, low=0, high=1, high_open=True,
        hint='Flax convention: PyTorch 0.1 is Flax 0.9, and 1 would never '
        'update the running statistics')
    _checks.finite_number('bn_epsilon', self.bn_epsilon, low=0,
                          low_open=True,
                          hint='PyTorch and the paper use 1e-5')

  def _check_dtype_and_layer_options(self) -> None:
    if self.dtype is not None:
      try:
        dtype = jnp.dtype(self.dtype)
      except TypeError:
        dtype = None
      if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise _checks.ArgumentTypeError(
            '`dtype` must be a floating-point dtype (float32, bfloat16, '
            'float16), got '
            f'{dtype if dtype is not None else _checks.describe(self.dtype)}'
            '.')
    if self.grad is not None:
      _checks.choice('grad', self.grad, geometry.GRAD_MODES)
    if self.implementation is not None:
      _checks.choice('implementation', self.implementation,
                     backends.available())
    # grad / implementation given to a kind without adder layers are
    # refused when the body layers are built (_layer_kwargs).

  def check_fields(self) -> None:
    """Refuses a field value the model cannot run with, naming the field.

    Called by every ``__call__`` and by
    :func:`adderjax.models.create_model`; subclasses extend it with their own
    fields.

    Raises:
      ValueError: (or :class:`TypeError`) naming the field and its value.
    """
    _checks.positive_int('num_classes', self.num_classes)
    self._check_batch_norm()
    self._check_dtype_and_layer_options()
    _checks.choice('head', self.head, HEADS)
    _checks.choice('slac_covariance', self.slac_covariance, slac.COVARIANCES)

  def check_input(self, x, name: str) -> None:
    self.check_fields()
    if x.ndim != 4:
      extra = ('; to count operations, pass the shape of one example, '
               'without the batch axis' if x.ndim == 5 else '')
      raise ValueError(f'{name} expects NHWC images [N, H, W, C], got an '
                       f'input of shape {x.shape}{extra}.')
