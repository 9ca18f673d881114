"""Adversarial training (Madry et al.) as a training method.

``config.method = 'adversarial'`` (the config token ``:adv`` on any model
config, e.g. ``lenet5_mnist.py:adder,adv``) trains on adversarial examples
made inside every train step by an attack of :mod:`adderjax.attacks`:

``loss = clean_weight * objective(clean) + (1 - clean_weight) *
objective(adversarial)``

where ``objective`` is the run's (:attr:`experiments.experiment.Experiment.
objective`: cross-entropy plus ``config.loss_terms``). The options
(``config.method_options``; ``:adv`` writes them all out):

================  ==============  =============================================
option            ``:adv``        meaning
================  ==============  =============================================
``attack``        'pgd'           'pgd', 'bim', 'mim' or 'fgsm'
``epsilon``       0.3 / 8/255     l_inf budget in pixels ([0, 1]); MNIST / else
``steps``         7               iterations of pgd / bim / mim
``step_size``     0.1 / 2/255     each iteration's step (None: the attack's
                                  default, see :mod:`adderjax.attacks`)
``random_start``  True            pgd starts at a uniform point of the ball
                                  (the other attacks start at the image)
``clean_weight``  0.0             the clean loss's share (0: Madry et al.)
================  ==============  =============================================

Choices (ours; the AdderNet robustness paper publishes no code):

* The attack runs the model in **evaluation mode** (BatchNorm on the
  running statistics, nothing updated), as the evaluation of
  :mod:`experiments.robustness` attacks it, so the examples a step trains on
  are adversarial for the network that will be deployed and every example's
  perturbation is independent of the rest of the batch. (TRADES does the
  same; Madry et al.'s code attacks in training mode.)
* The attack maximises the plain cross-entropy; the parameters' gradient
  does not flow through the attack (the examples are constants of the
  step).
* The networks train in training mode: the adversarial batch (and, with
  ``clean_weight > 0``, the clean batch in a pass of its own, first) updates
  the BatchNorm running statistics, one after the other as two forward
  passes of a PyTorch model would.

Metrics of a train step (sums over the batch, like every step's):
``loss`` the objective minimised; ``top1`` / ``top5`` the clean batch's
accuracy (training mode); ``loss/clean`` and ``loss/adversarial`` the two
cross-entropies; ``adversarial/top1`` the accuracy on the adversarial
examples. Evaluation during training is the usual clean one;
``python -m experiments.robustness`` measures the robustness of the result.

The state is the supervised one (:class:`experiments.steps.TrainState`), so
checkpoints, resume, multi-device (``jit`` over a mesh and ``pmap``, where
each device attacks its own rows with its own random start) and the NaN stop
work as for any run.

Examples:
  >>> from experiments import methods
  >>> sorted(methods.get_method('adversarial').defaults)
  ['attack', 'clean_weight', 'epsilon', 'random_start', 'step_size', 'steps']
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from adderjax import attacks
from experiments import errors
from experiments import losses
from experiments import methods
from experiments import parallel
from experiments import steps

#: Folded into the step's key to draw the attack's random start.
_ATTACK_STREAM = 0x5EED


def standardize(pixels: jax.Array, mean, std, dtype=jnp.float32) -> jax.Array:
  """Pixel-space ``[0, 1]`` images to the model's input ``(x - mean) / std``.

  The float counterpart of :func:`experiments.steps.normalize` (which takes
  ``uint8``): ``standardize(images / 255)`` equals ``normalize(images)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> float(standardize(jnp.ones((1, 2, 2, 1)), (0.5,), (0.5,)).max())
    1.0
  """
  x = (pixels.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / (
      jnp.asarray(std, jnp.float32))
  return x.astype(dtype)


def attack_loss(apply_fn: Callable, variables, mean, std,
                dtype=jnp.float32) -> attacks.LossFn:
  """``loss(x, labels)`` of a model in evaluation mode on pixel-space ``x``.

  The model's normalisation is inside, so an attack's gradient flows
  through it; BatchNorm uses the running statistics (``train=False``).
  """
  return attacks.classifier_loss(
      apply_fn, variables,
      preprocess=lambda x: standardize(x, mean, std, dtype),
      train=False, mutable=False)


def run_attack(options: dict[str, Any], loss_fn: attacks.LossFn,
               pixels: jax.Array, labels: jax.Array,
               key: jax.Array) -> jax.Array:
  """The adversarial examples ``options`` (``method_options``) describe."""
  return attacks.attack(
      options['attack'], loss_fn, pixels, labels, options['epsilon'],
      steps=options['steps'], step_size=options['step_size'],
      random_start=options['random_start'], key=key)


def make_adversarial_train_step(apply_fn: Callable,
                                tx: optax.GradientTransformation, mean, std,
                                options: dict[str, Any],
                                dtype=jnp.float32,
                                axis_name: str | None = None,
                                remat: str = 'none',
                                objective: losses.Objective | None = None
                                ) -> Callable:
  """One adversarial-training step ``(state, batch) -> (state, metrics)``.

  Args:
    apply_fn: the model's ``apply``.
    tx: the optimizer.
    mean: per-channel normalisation mean (pixel values in [0, 1]).
    std: per-channel normalisation standard deviation.
    options: the method's options (:attr:`Adversarial.defaults` keys).
    dtype: the dtype the images are normalised to.
    axis_name: the ``pmap`` axis (``None`` under ``jit``).
    remat: a key of :data:`experiments.steps.REMAT_POLICIES`, applied to
      the loss as :func:`experiments.steps.make_train_step` does.
    objective: what is minimised on each batch (default cross-entropy).

  Raises:
    ValueError: an unknown ``remat``.
  """
  if remat not in steps.REMAT_POLICIES:
    raise ValueError(f'remat {remat!r}: use one of '
                     f'{sorted(steps.REMAT_POLICIES)}.')
  policy = steps.REMAT_POLICIES[remat]
  objective = losses.Objective() if objective is None else objective
  mutable = ['batch_stats'] + (
      ['intermediates'] if objective.collect_intermediates else [])
  clean_weight = float(options['clean_weight'])
  weights = {'clean': clean_weight, 'adversarial': 1.0 - clean_weight}
  prepare = functools.partial(standardize, mean=mean, std=std, dtype=dtype)

  def step(state: steps.TrainState, batch: dict):
    pixels = batch['image'].astype(jnp.float32) / 255.0
    labels = batch['label']
    key = jax.random.fold_in(
        jax.random.wrap_key_data(state.rng, impl=steps.PRNG_IMPL), state.step)
    attack_key = jax.random.fold_in(key, _ATTACK_STREAM)
    if axis_name is not None:  # each device its own random start
      attack_key = jax.random.fold_in(attack_key,
                                      jax.lax.axis_index(axis_name))
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    adversarial = run_attack(
        options, attack_loss(apply_fn, variables, mean, std, dtype), pixels,
        labels, attack_key)
    inputs = {'clean': pixels, 'adversarial': adversarial}

    def forward(params, batch_stats, name):
      images = prepare(inputs[name])
      logits, updates = apply_fn(
          {'params': params, 'batch_stats': batch_stats}, images, train=True,
          mutable=mutable, rngs={'dropout': key})
      return images, logits, updates

    def loss_fn(params):
      batch_stats, total, extras, logits = state.batch_stats, 0.0, {}, {}
      for name in ('clean', 'adversarial'):
        if weights[name] == 0.0:
          continue
        images, logits[name], updates = forward(params, batch_stats, name)
        batch_stats = updates.get('batch_stats', batch_stats)
        loss, extra = objective(losses.StepOutputs(
            logits=logits[name], labels=labels, images=images,
            intermediates=updates.get('intermediates', {}), key=key))
        total = total + weights[name] * loss
        for k, v in extra.items():
          extras[k] = extras.get(k, 0.0) + weights[name] * v
      return total, (logits, batch_stats, extras)

    if policy is not None:
      loss_fn = jax.checkpoint(loss_fn, policy=policy)
    (loss, (logits, batch_stats, extras)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    # A batch the loss does not use is still measured (training mode, its
    # statistics discarded).
    for name in ('clean', 'adversarial'):
      if name not in logits:
        _, out, _ = forward(state.params, state.batch_stats, name)
        logits[name] = jax.lax.stop_gradient(out)
    grads = parallel.axis_mean(grads, axis_name)
    batch_stats = parallel.axis_mean(batch_stats, axis_name)
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, param_updates)

    count = jnp.asarray(labels.shape[0], jnp.float32)
    clean = losses.classification_metrics(logits['clean'], labels)
    adv = losses.classification_metrics(logits['adversarial'], labels)
    metrics = {'loss': loss * count, 'top1': clean['top1'],
               'top5': clean['top5'], 'count': clean['count'],
               'loss/clean': clean['loss'],
               'loss/adversarial': adv['loss'],
               'adversarial/top1': adv['top1']}
    metrics.update({k: v * count for k, v in extras.items()})
    metrics = parallel.axis_sum(metrics, axis_name)
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics
  return step


def _number(options, key, *, low, low_open=False, high=None,
            allow_none=False):
  value = options[key]
  if allow_none and value is None:
    return
  ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value) and (value > low if low_open else
                                      value >= low)
        and (high is None or value <= high))
  if not ok:
    bound = f'{">" if low_open else ">="} {low:g}' if high is None else (
        f'in [{low:g}, {high:g}]')
    raise errors.ConfigError(
        f'method_options.{key} must be a finite number {bound}'
        f'{" (or None)" if allow_none else ""}, got {value!r}.')


class Adversarial(methods.Method):
  """Adversarial training: the network trains on attacked batches."""

  name = 'adversarial'
  #: As the ``:adv`` token writes them for a non-MNIST config.
  defaults = {'attack': 'pgd', 'epsilon': 8 / 255, 'steps': 7,
              'step_size': 2 / 255, 'random_start': True,
              'clean_weight': 0.0}

  def check_options(self, options: dict[str, Any]) -> None:
    if options['attack'] not in attacks.ATTACKS:
      raise errors.ConfigError(f'method_options.attack '
                               f'{options["attack"]!r}: use one of '
                               f'{attacks.ATTACKS}.')
    _number(options, 'epsilon', low=0)
    _number(options, 'step_size', low=0, low_open=True, allow_none=True)
    _number(options, 'clean_weight', low=0, high=1)
    steps_ = options['steps']
    if (not isinstance(steps_, int) or isinstance(steps_, bool)
        or steps_ < 1):
      raise errors.ConfigError(f'method_options.steps must be an int >= 1, '
                               f'got {steps_!r}.')
    if not isinstance(options['random_start'], bool):
      raise errors.ConfigError(f'method_options.random_start must be True '
                               f'or False, got {options["random_start"]!r}.')

  def init_fn(self, exp) -> Callable[[jax.Array], steps.TrainState]:
    return steps.make_init(exp.model, exp.tx, exp.image_shape)

  def train_step_fn(self, exp, remat: str) -> Callable:
    return make_adversarial_train_step(
        exp.model.apply, exp.tx, exp.mean, exp.std, self.options(exp.config),
        exp.dtype, exp.runner.axis_name, remat=remat,
        objective=exp.objective)


methods.register_method(Adversarial())
