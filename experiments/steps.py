"""The train state and the jittable step functions of every experiment.

One train step (:func:`make_train_step`) serves ``jax.jit`` over a mesh and
``jax.pmap``: under ``pmap`` (``axis_name`` set) gradients and BatchNorm
statistics are averaged with ``lax.pmean`` and metric sums added with
``lax.psum``; under ``jit`` the batch is one global array and XLA does the
reductions. What the step minimises is an :class:`experiments.losses.Objective`
(cross-entropy by default); the loop never sees it.

BatchNorm: training normalises with the batch's statistics and updates the
running averages ``running = m * running + (1 - m) * batch``
(``m = config.model.bn_momentum``); evaluation (:func:`make_eval_step`) uses
the running averages only. :func:`make_bn_stats_step` gives one batch's
statistics with the current weights, for "precise BN" recalibration.

Examples:
  >>> import jax.numpy as jnp
  >>> x = normalize(jnp.full((1, 2, 2, 1), 255, jnp.uint8), (0.5,), (0.5,))
  >>> float(x.max())
  1.0
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

import adderjax
from experiments import losses
from experiments import parallel

PyTree = Any


class TrainState(flax.struct.PyTreeNode):
  """Everything a step reads and writes (and a checkpoint holds).

  Attributes:
    step: number of optimizer steps taken (int32 scalar).
    params: model parameters.
    batch_stats: BatchNorm running statistics.
    opt_state: optimizer state (momentum buffers, schedule count).
    rng: raw ``uint32`` key data of the run's base PRNG key; step ``s`` uses
      ``fold_in(key, s)`` (dropout-style randomness, if a model has any).
  """
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  rng: jax.Array


#: PRNG implementation of the run's keys. ``'rbg'`` (XLA's RngBitGenerator)
#: rather than the default threefry: jitting a model's ``init`` with threefry
#: keys takes XLA:CPU 5-7x longer to compile (measured: 25 s vs 4.7 s for a
#: small ResNet-20 on 2 shared cores), and the values only need to be
#: deterministic for a given seed and backend, which rbg is.
PRNG_IMPL = 'rbg'

#: ``remat`` of :func:`make_train_step` -> the ``jax.checkpoint`` policy of
#: the loss (``None``: no ``jax.checkpoint``).
REMAT_POLICIES = {'none': None,
                  'layer_outputs': adderjax.layer_outputs_saveable}
#: Values of ``config.remat``: a policy name, or ``'auto'``
#: (:func:`resolve_remat`).
REMAT_CHOICES = ('auto',) + tuple(REMAT_POLICIES)


def resolve_remat(remat: str, platform: str,
                  model: tuple[str, str] | None = None) -> str:
  """``config.remat`` for a step compiled for ``platform``.

  ``'auto'`` is ``'layer_outputs'`` on accelerators, where the adder
  kernels cannot take fused producers and memory is what limits the batch
  (TPU v5e, ResNet-20 at 128 images per chip: 74 instead of 89 MB;
  ResNet-50 at 32: 2.04 instead of 2.81 GB), and ``'none'`` on CPU, where
  the recomputation costs time (LeNet-5 on MNIST: 6 % per step) and memory
  is ample; on TPU a ``model`` ``(name, kind)`` listed in
  :data:`TPU_AUTO_REMAT` takes the policy found for it there. Other values
  are returned as they are.

  Raises:
    ValueError: an unknown value.

  Examples:
    >>> resolve_remat('auto', 'cpu'), resolve_remat('auto', 'tpu')
    ('none', 'layer_outputs')
  """
  if remat not in REMAT_CHOICES:
    raise ValueError(f'remat {remat!r}: use one of {REMAT_CHOICES}.')
  if remat != 'auto':
    return remat
  if platform == 'cpu':
    return 'none'
  if platform == 'tpu' and model in TPU_AUTO_REMAT:
    return TPU_AUTO_REMAT[model][0]
  return 'layer_outputs'


#: What ``remat='auto'`` (with ``remat_blocks='auto'``) does on TPU for a
#: model kind: ``(model name, kind) -> (step policy, ResNet remat_blocks)``.
#: Chosen by ``python -m experiments.aot --search_remat`` (of the candidates
#: whose compiled temporary memory is at most 1.5x the CNN twin's default,
#: the one with the fewest adder kernel calls, then the fewest bytes
#: accessed; v5e 2x4, 128 images per chip; ``docs/roofline.md``). ResNet-20's
#: AddNN: 74.2 MB (2.28x the CNN's 32.6 MB) under the policy alone, 48.4 MB
#: (1.48x) with the blocks of stages 1 and 2 also under
#: ``flax.linen.remat``, and no adder forward run twice (40 kernel calls
#: either way). Models not listed keep :func:`resolve_remat`'s policy alone.
TPU_AUTO_REMAT = {
    ('resnet20', 'adder'): ('layer_outputs', (1, 2)),
}

#: Words of ``config.remat_blocks`` (besides stage numbers such as ``'1,2'``).
REMAT_BLOCKS_WORDS = ('auto', 'none', 'all')


def parse_remat_blocks(value: str) -> str | bool | tuple[int, ...]:
  """``config.remat_blocks`` as ``'auto'``, ``False``, ``True`` or stages.

  Raises:
    ValueError: not ``'auto'``, ``'none'``, ``'all'`` or stage numbers
      counted from 1, comma-separated.

  Examples:
    >>> parse_remat_blocks('none'), parse_remat_blocks('1,2')
    (False, (1, 2))
  """
  if not isinstance(value, str):
    raise ValueError(f'remat_blocks {value!r}: a string, one of '
                     f'{REMAT_BLOCKS_WORDS} or stage numbers such as "1,2".')
  text = value.strip().lower()
  if text in REMAT_BLOCKS_WORDS:
    return {'auto': 'auto', 'none': False, 'all': True}[text]
  try:
    stages = tuple(int(v) for v in text.split(','))
  except ValueError:
    stages = ()
  if not stages or min(stages) < 1:
    raise ValueError(
        f'remat_blocks {value!r}: use one of {REMAT_BLOCKS_WORDS} or the '
        f'stage numbers whose residual blocks are recomputed, counted from '
        f'1 and comma-separated (e.g. "1,2").')
  return stages


def resolve_remat_blocks(config, platform: str):
  """The ResNet ``remat_blocks`` a config implies on ``platform``, or None.

  ``config.remat_blocks``: ``'none'``, ``'all'`` or stages say it; ``'auto'``
  is, when ``config.remat`` is ``'auto'`` too, the model's entry of
  :data:`TPU_AUTO_REMAT` on TPU, and otherwise None (the model as
  configured: no block recompute).

  Examples:
    >>> import ml_collections
    >>> c = ml_collections.ConfigDict(dict(remat='auto', remat_blocks='auto',
    ...     model=dict(name='resnet20', kind='adder')))
    >>> resolve_remat_blocks(c, 'tpu'), resolve_remat_blocks(c, 'cpu')
    ((1, 2), None)
  """
  value = parse_remat_blocks(config.remat_blocks)
  if value != 'auto':
    return value
  if config.remat != 'auto' or platform != 'tpu':
    return None
  choice = TPU_AUTO_REMAT.get((config.model.name, config.model.kind))
  return None if choice is None else choice[1]


def make_init(model: flax.linen.Module, tx: optax.GradientTransformation,
              image_shape) -> Callable[[jax.Array], TrainState]:
  """``key -> TrainState``: the model's initial train state."""
  def init(key):
    init_key, rng_key = jax.random.split(key)
    variables = model.init(init_key, jnp.zeros((1,) + tuple(image_shape)),
                           train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=tx.init(params),
                      rng=jax.random.key_data(rng_key))
  return init


def init_host_state(model: flax.linen.Module,
                    tx: optax.GradientTransformation, seed: int,
                    image_shape) -> TrainState:
  """The initial state, as numpy arrays (the same on every process)."""
  init = make_init(model, tx, image_shape)
  state = jax.jit(init)(jax.random.key(seed, impl=PRNG_IMPL))
  return jax.tree.map(np.asarray, jax.device_get(state))


def normalize(images: jax.Array, mean, std, dtype=jnp.float32) -> jax.Array:
  """``uint8`` images to ``(x / 255 - mean) / std`` in ``dtype``."""
  x = images.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return x.astype(dtype)


def make_train_step(apply_fn: Callable, tx: optax.GradientTransformation,
                    mean, std, dtype=jnp.float32,
                    axis_name: str | None = None,
                    remat: str = 'none',
                    objective: losses.Objective | None = None) -> Callable:
  """One optimizer step ``(state, batch) -> (state, metric sums)``.

  Args:
    apply_fn: the model's ``apply``.
    tx: the optimizer.
    mean: per-channel normalisation mean (pixel values in [0, 1]).
    std: per-channel normalisation standard deviation.
    dtype: the dtype the images are normalised to.
    axis_name: the ``pmap`` axis (``None`` under ``jit``).
    remat: a key of :data:`REMAT_POLICIES` (see :func:`resolve_remat`): the
      ``jax.checkpoint`` policy of the loss. ``'layer_outputs'`` keeps the
      layers' outputs and recomputes the elementwise ops between them in
      the backward pass (:data:`adderjax.layer_outputs_saveable`);
      ``'none'`` does not wrap the loss.
    objective: what the step minimises (default: cross-entropy alone).
      Each extra term's value is reported as the metric ``loss/<name>``,
      as a sum over the batch like the other metrics.

  Raises:
    ValueError: an unknown ``remat``.
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f'remat {remat!r}: use one of {sorted(REMAT_POLICIES)}.')
  policy = REMAT_POLICIES[remat]
  objective = losses.Objective() if objective is None else objective
  mutable = ['batch_stats'] + (
      ['intermediates'] if objective.collect_intermediates else [])

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    images = normalize(batch['image'], mean, std, dtype)
    labels = batch['label']
    key = jax.random.fold_in(
        jax.random.wrap_key_data(state.rng, impl=PRNG_IMPL), state.step)

    def loss_fn(params):
      logits, updates = apply_fn(
          {'params': params, 'batch_stats': state.batch_stats}, images,
          train=True, mutable=mutable, rngs={'dropout': key})
      loss, extra = objective(losses.StepOutputs(
          logits=logits, labels=labels, images=images,
          intermediates=updates.get('intermediates', {}), key=key))
      return loss, (logits, updates, extra)

    if policy is not None:
      loss_fn = jax.checkpoint(loss_fn, policy=policy)
    (_, (logits, updates, extra)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    grads = parallel.axis_mean(grads, axis_name)
    batch_stats = parallel.axis_mean(
        updates.get('batch_stats', state.batch_stats), axis_name)
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, param_updates)
    metrics = losses.classification_metrics(logits, labels)
    count = jnp.asarray(labels.shape[0], jnp.float32)
    metrics.update({k: v * count for k, v in extra.items()})
    metrics = parallel.axis_sum(metrics, axis_name)
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics
  return step


def make_eval_step(apply_fn: Callable, mean, std, dtype=jnp.float32,
                   axis_name: str | None = None) -> Callable:
  """Masked metric sums with the running BatchNorm statistics."""
  def step(state: TrainState, batch: dict) -> dict:
    images = normalize(batch['image'], mean, std, dtype)
    logits = apply_fn({'params': state.params,
                       'batch_stats': state.batch_stats}, images,
                      train=False, mutable=False)
    return parallel.axis_sum(
        losses.classification_metrics(logits, batch['label'], batch['mask']),
        axis_name)
  return step


def make_bn_stats_step(apply_fn: Callable, mean, std, dtype=jnp.float32,
                       axis_name: str | None = None) -> Callable:
  """Batch statistics of one batch with the current weights.

  Runs the model in training mode from zeroed running statistics with
  momentum ``m``: the result is ``(1 - m) * batch_stat``; dividing by
  ``(1 - m)`` is done by the caller (see
  :func:`experiments.experiment.Experiment.recalibrate_batch_stats`).
  """
  def step(state: TrainState, batch: dict) -> PyTree:
    images = normalize(batch['image'], mean, std, dtype)
    zeros = jax.tree.map(jnp.zeros_like, state.batch_stats)
    _, updates = apply_fn({'params': state.params, 'batch_stats': zeros},
                          images, train=True, mutable=['batch_stats'])
    return parallel.axis_mean(updates['batch_stats'], axis_name)
  return step
