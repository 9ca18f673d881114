"""Training methods: the state a run carries and what one step does.

A method is named by ``config.method`` and builds, for an
:class:`experiments.experiment.Experiment`, the functions the loop runs:
``init_fn`` (``key -> state``), ``train_step_fn`` (``(state, batch) ->
(state, metric sums)``), ``eval_step_fn`` and ``bn_stats_step_fn``. The loop,
the checkpoints and the duties only need the state to be a pytree with
``step``, ``params`` and ``batch_stats`` (a :class:`experiments.steps.TrainState`
or a subclass), so a method that trains a second network beside the first
(a co-trained or frozen teacher) subclasses the state with its own fields,
its own step, and registers itself here: no loop edit.

:class:`Supervised` (``'supervised'``, the default) is the paper's: one
network, the objective of ``config.loss_terms``
(:func:`experiments.losses.objective_from_spec`), SGD with the adaptive
learning rate.

Examples:
  >>> 'supervised' in METHODS
  True
  >>> get_method('supervised').name
  'supervised'
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from experiments import errors
from experiments import steps


class Method:
  """A training method (subclass it and :func:`register_method` it).

  Attributes:
    name: the value of ``config.method`` that selects it.
    defaults: the keys ``config.method_options`` may set, with their
      defaults (a method token such as ``:pkkd`` writes them all out).
  """

  name: str = ''
  defaults: dict[str, Any] = {}

  def options(self, config) -> dict[str, Any]:
    """``config.method_options`` over :attr:`defaults`, checked.

    Raises:
      experiments.errors.ConfigError: an unknown key, or a value
        :meth:`check_options` refuses.
    """
    given = dict(config.method_options.to_dict()
                 if hasattr(config.method_options, 'to_dict')
                 else config.method_options)
    unknown = sorted(set(given) - set(self.defaults))
    if unknown:
      raise errors.ConfigError(
          f'method_options {unknown} are not options of method '
          f'{self.name!r}; its options: {sorted(self.defaults) or "none"}.')
    merged = {**self.defaults, **given}
    self.check_options(merged)
    return merged

  def check_options(self, options: dict[str, Any]) -> None:
    """Raises ``errors.ConfigError`` naming a bad option value."""

  def init_fn(self, exp) -> Callable[[jax.Array], Any]:
    """``key -> state``: the run's initial state."""
    raise NotImplementedError(f'{type(self).__name__}.init_fn')

  def prepare_host_state(self, exp, host_state):
    """The initial host state after ``init_fn`` (e.g. read a fixed teacher
    from disk); the default returns it unchanged."""
    return host_state

  def train_step_fn(self, exp, remat: str) -> Callable:
    """``(state, batch) -> (state, metric sums)`` (uncompiled)."""
    raise NotImplementedError(f'{type(self).__name__}.train_step_fn')

  def eval_step_fn(self, exp) -> Callable:
    """``(state, batch) -> metric sums`` with the running statistics."""
    return steps.make_eval_step(exp.model.apply, exp.mean, exp.std,
                                exp.dtype, exp.runner.axis_name)

  def bn_stats_step_fn(self, exp) -> Callable:
    """``(state, batch) -> (1 - m) * batch statistics`` (BN recalibration)."""
    return steps.make_bn_stats_step(exp.model.apply, exp.mean, exp.std,
                                    exp.dtype, exp.runner.axis_name)


class Supervised(Method):
  """One network trained on the labels (the paper's method)."""

  name = 'supervised'

  def init_fn(self, exp) -> Callable[[jax.Array], steps.TrainState]:
    return steps.make_init(exp.model, exp.tx, exp.image_shape)

  def train_step_fn(self, exp, remat: str) -> Callable:
    return steps.make_train_step(
        exp.model.apply, exp.tx, exp.mean, exp.std, exp.dtype,
        exp.runner.axis_name, remat=remat, objective=exp.objective)


#: ``config.method`` -> the method.
METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
  """Makes ``method`` selectable as ``config.method = method.name``.

  Raises:
    ValueError: the name is empty or taken.
  """
  if not method.name:
    raise ValueError(f'{type(method).__name__} has no name.')
  if method.name in METHODS:
    raise ValueError(f'method {method.name!r} is registered already.')
  METHODS[method.name] = method
  return method


def get_method(name: str) -> Method:
  """The method ``config.method`` names.

  Raises:
    experiments.errors.ConfigError: an unknown name (the known ones listed).
  """
  if name not in METHODS:
    raise errors.ConfigError(f'method {name!r}: use one of {sorted(METHODS)}.')
  return METHODS[name]


register_method(Supervised())
