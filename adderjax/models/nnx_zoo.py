"""The model zoo as Flax NNX modules (``create_model(..., api='nnx')``).

A zoo model for NNX is :class:`ZooNNX`: the Linen zoo model (one definition
per model, see :mod:`adderjax.models`) held by ``flax.nnx.bridge.ToNNX``, with
its variables as NNX state. It is a real NNX module: ``nnx.state``,
``nnx.split`` / ``nnx.merge``, ``nnx.jit``, ``nnx.grad``, ``nnx.Optimizer``,
``nnx.eval_shape`` and ``model.train()`` / ``model.eval()`` work on it, and
:func:`adderjax.optim.adder_mask` finds its adder kernels.

Why a bridge, not NNX classes of every model: the Linen definition is the
only one, so the NNX model computes what the Linen model computes (same
parameters, same logits, same BatchNorm statistics) for every model, kind and
field (``head='slac'``, ``grad=``, ``implementation=``, ...), with nothing to
keep in step.

State layout: ``model.net`` is the ``ToNNX`` module, whose attributes are the
Linen variables with their Linen paths, each collection a variable type:
Linen's ``variables['params']['conv2']['kernel']`` is
``nnx.state(model, nnx.Param)['net']['conv2']['kernel']`` and
``variables['batch_stats']['bn1']['mean']`` is
``nnx.state(model, nnx.BatchStat)['net']['bn1']['mean']``.
:meth:`ZooNNX.linen_variables` and :meth:`ZooNNX.load_linen_variables`
convert both ways (Linen checkpoints, :func:`adderjax.count_ops`, export).

Modes: like ``nnx.BatchNorm``, a new model is in training mode: a call
normalises with the batch statistics and updates the running averages held
in the model (momentum ``bn_momentum``); after ``model.eval()`` it normalises
with the running averages and changes nothing (``model.train()`` goes back).
``model(x, train=...)`` overrides the mode for one call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import functools
from typing import Any

import flax.linen as nn
from flax import nnx
from flax.nnx import traversals
from flax.nnx import variablelib
from flax.nnx.bridge import variables as bridge_variables
import jax
import jax.numpy as jnp
import numpy as np

from adderjax import _checks


def _init_fn(linen_model: nn.Module, shape: tuple[int, ...], key):
  return linen_model.init(key, jnp.zeros(shape, jnp.float32), train=False)


_jit_init = jax.jit(_init_fn, static_argnums=(0, 1))


def _linen_init(linen_model: nn.Module, shape: tuple[int, ...], key):
  """The Linen variables, under ``jax.jit``; compiled once per model."""
  try:
    hash(linen_model)
  except TypeError:  # a field that is not hashable (e.g. a list)
    return jax.jit(functools.partial(_init_fn, linen_model, shape))(key)
  return _jit_init(linen_model, shape, key)


class ZooNNX(nnx.Module):
  """A Linen zoo model as an NNX module (see the module docstring).

  Build it with :func:`adderjax.models.create_model` and ``api='nnx'``. The
  parameters are those of ``linen_model.init(rngs.params(), x, train=False)``
  for an input ``x`` of shape ``(1, *input_shape)`` (the Linen ``init`` runs
  under ``jax.jit``; under ``nnx.eval_shape`` nothing is computed).

  Attributes:
    net: the ``flax.nnx.bridge.ToNNX`` module holding the Linen model and its
      variables.
    use_running_average: ``False`` (training mode, the default) or ``True``
      (evaluation mode); set by ``model.train()`` / ``model.eval()``.
    example_input: a :class:`jax.ShapeDtypeStruct` of one input image
      ``(1, *input_shape)``: what the model was initialised on, and what
      :func:`adderjax.optim.adder_mask` runs the Linen model on.

  Args:
    linen_model: an unbound Linen model of the zoo (``__call__(x, train)``).
    input_shape: one image's shape ``(height, width, channels)``.
    rngs: an ``nnx.Rngs``; its ``params`` stream (or ``default``) gives the
      initialisation key.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from adderjax.models import create_model
    >>> model = create_model('lenet5_bn', kind='adder', num_classes=10,
    ...                      api='nnx', rngs=nnx.Rngs(0))
    >>> x = jnp.ones((2, 28, 28, 1))
    >>> model(x).shape  # training mode: batch statistics, running averages
    (2, 10)
    >>> model.eval()    # running averages
    >>> model(x).shape
    (2, 10)
    >>> nnx.state(model, nnx.Param)['net']['conv2']['kernel'].shape
    (5, 5, 6, 16)
  """

  def __init__(self, linen_model: nn.Module, *,
               input_shape: Sequence[int], rngs: nnx.Rngs):
    if not isinstance(linen_model, nn.Module):
      raise _checks.ArgumentTypeError(
          '`linen_model` must be a flax.linen.Module, got '
          f'{_checks.describe(linen_model)}.')
    shape = _checks.shape('input_shape', input_shape,
                          hint='one image: (height, width, channels)')
    if len(shape) != 3:
      raise ValueError('`input_shape` must be one image (height, width, '
                       f'channels), got {tuple(input_shape)!r}.')
    if not isinstance(rngs, nnx.Rngs):
      raise _checks.ArgumentTypeError(
          f'`rngs` must be an nnx.Rngs, got {_checks.describe(rngs)}.')
    self.example_input = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    self.use_running_average = False
    self.net = nnx.bridge.ToNNX(linen_model)
    self._set_linen_variables(
        _linen_init(linen_model, self.example_input.shape, rngs.params()))

  def _set_linen_variables(self, variables: Mapping[str, Any]) -> None:
    # What ToNNX itself does after a lazy_init: one attribute per top-level
    # Linen name, the collections merged (a collection is a variable type).
    attrs = bridge_variables.linen_vars_to_nnx_attrs(dict(variables))
    for name, value in attrs.items():
      setattr(self.net, name, nnx.data(value))

  @property
  def linen_model(self) -> nn.Module:
    """The wrapped (unbound) Linen model."""
    return self.net.to_nnx__module

  def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
    """The logits ``[N, num_classes]`` (float32) of NHWC images ``x``.

    Args:
      x: images ``[N, H, W, C]`` of the model's input size.
      train: ``True``: BatchNorm uses the batch statistics and the running
        averages in the model are updated; ``False``: the running averages
        are used and nothing changes; ``None`` (default): the model's mode
        (``not use_running_average``).

    Returns:
      The float32 logits.
    """
    if train is None:
      train = not self.use_running_average
    if not isinstance(train, (bool, np.bool_)):
      raise _checks.ArgumentTypeError(
          f'`train` must be a bool or None, got {_checks.describe(train)}.')
    train = bool(train)
    return self.net(x, train=train,
                    mutable=['batch_stats'] if train else False)

  def linen_variables(self) -> dict[str, Any]:
    """The Linen variables ``{'params': ..., 'batch_stats': ...}``.

    Plain nested dicts of the current arrays, what the Linen model's
    ``apply`` takes.

    Returns:
      A dict of collections.

    Examples:
      >>> from flax import nnx
      >>> from adderjax.models import create_model
      >>> model = create_model('lenet5_bn', kind='adder', num_classes=10,
      ...                      api='nnx', rngs=nnx.Rngs(0))
      >>> variables = model.linen_variables()
      >>> sorted(variables), variables['params']['fc3']['kernel'].shape
      (['batch_stats', 'params'], (84, 10))
    """
    flat: dict[tuple, Any] = {}
    for path, var in nnx.to_flat_state(nnx.state(self.net)):
      if isinstance(var, nnx.RngState):
        continue
      col = variablelib.variable_name_from_type(type(var))
      flat[(col, *path)] = var.get_value()
    return traversals.unflatten_mapping(flat)

  def load_linen_variables(self, variables: Mapping[str, Any]) -> None:
    """Sets the model's state from Linen variables (e.g. a Linen checkpoint).

    Args:
      variables: ``{'params': ..., 'batch_stats': ...}`` of the same Linen
        model: every collection with the model's paths and shapes.

    Raises:
      ValueError: a path missing from ``variables`` or not in the model, or a
        shape that differs (the message names the first one).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from adderjax.models import create_model
      >>> model = create_model('lenet5_bn', kind='adder', num_classes=10,
      ...                      api='nnx', rngs=nnx.Rngs(0))
      >>> variables = jax.tree.map(jnp.zeros_like, model.linen_variables())
      >>> model.load_linen_variables(variables)
      >>> float(abs(model.net.conv2['kernel'][...]).sum())
      0.0
    """
    if not isinstance(variables, Mapping):
      raise _checks.ArgumentTypeError(
          '`variables` must be a mapping of Linen collections, got '
          f'{_checks.describe(variables)}.')
    current = traversals.flatten_mapping(self.linen_variables())
    given = traversals.flatten_mapping(
        nn.meta.unbox(dict(variables)))
    for path in sorted(set(current) | set(given), key=str):
      name = '/'.join(map(str, path))
      if path not in given:
        raise ValueError(f'`variables` lacks {name} of the model.')
      if path not in current:
        raise ValueError(f'`variables` has {name}, which the model has not.')
      if np.shape(given[path]) != np.shape(current[path]):
        raise ValueError(
            f'`variables` {name} has shape {np.shape(given[path])}, the '
            f'model {np.shape(current[path])}.')
    # In place (the variables stay the same objects): the Linen collection
    # drops out of the path, as in ToNNX's attributes.
    values = {path[1:]: jnp.asarray(value) for path, value in given.items()}
    nnx.update(self.net, traversals.unflatten_mapping(values))


__all__ = ['ZooNNX']
