"""The training loop of every experiment: ``train_and_evaluate(config, workdir)``.

One step function (:func:`make_train_step`) runs under ``jax.jit`` with
``NamedSharding`` over a mesh of all devices (default) or under ``jax.pmap``
(``config.parallelism='pmap'``); :mod:`experiments.parallel` places the data.
The optimizer is the paper's recipe: :func:`adderjax.optim.addernet_sgd`
(adaptive learning rate on the adder kernels, weight decay, SGD momentum)
with the official cosine schedule over ``config.num_epochs``.

BatchNorm and evaluation: training normalises with the batch's statistics and
updates running averages ``running = m * running + (1 - m) * batch`` with
``m = config.model.bn_momentum`` (Flax convention; PyTorch's momentum 0.1 is
0.9 here). Evaluation uses the running averages only (``train=False``), as
the official code's ``model.eval()``. Early in AdderNet training the scale of
the adder outputs moves fast, so the running averages lag the current
weights and the first epochs' test accuracy can be far below the training
accuracy (the official code on MNIST: 45.9 % vs 90.7 % after epoch 1). It is
a property of the running averages, not of the weights: it fades as the
learning rate decays. Two knobs address it: a smaller ``bn_momentum`` (the
averages follow faster), and ``config.bn_recalibration_batches > 0``, which
before every evaluation recomputes the statistics as the exact mean over
that many training batches with the current weights (the evaluation then
reports the accuracy of the weights themselves; the stored running averages
are replaced by the recomputed ones in the state, as in "precise BN").

Examples:
  >>> import jax.numpy as jnp
  >>> m = classification_metrics(jnp.array([[2., 1., 0.], [0., 1., 2.]]),
  ...                            jnp.array([0, 0]))
  >>> float(m['top1']), float(m['count'])
  (1.0, 2.0)
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import time
from typing import Any, Callable

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import adderjax
from experiments import checkpointing
from experiments import data as data_lib
from experiments import errors
from experiments import metrics as metrics_lib
from experiments import parallel
from experiments import preemption
from experiments import workdir_lock

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


# ----------------------------------------------------------------------------
# Config validation.


def _flat_keys(config: ml_collections.ConfigDict, prefix='') -> set[str]:
  keys = set()
  for k, v in config.items():
    key = prefix + k
    if isinstance(v, ml_collections.ConfigDict) and key != 'model.overrides':
      keys |= _flat_keys(v, key + '.')
    else:
      keys.add(key)
  return keys


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming unknown keys or out-of-range values.

  Keys are checked against ``experiments/configs/default.py`` (everything
  under ``model.overrides`` is passed to the model, which checks it).
  """
  from experiments.configs import default  # pylint: disable=g-import-not-at-top
  known = _flat_keys(default.get_config())
  unknown = sorted(_flat_keys(config) - known)
  if unknown:
    raise errors.ConfigError(
        f'unknown config key(s) {unknown}; valid keys are in '
        'experiments/configs/default.py (python -m experiments.main --help '
        'lists them).')
  missing = sorted(known - _flat_keys(config))
  if missing:
    raise errors.ConfigError(f'config lacks key(s) {missing}; derive configs '
                             'from experiments/configs/default.py.')
  if config.model.kind not in ('cnn', 'adder', 'bnn'):
    raise errors.ConfigError(f"model.kind {config.model.kind!r}: use 'cnn', "
                             "'adder' or 'bnn'.")
  if config.remat not in REMAT_CHOICES:
    raise errors.ConfigError(f'remat {config.remat!r}: use one of '
                             f'{REMAT_CHOICES}.')
  if config.parallelism not in ('jit', 'pmap'):
    raise errors.ConfigError(f"parallelism {config.parallelism!r}: use 'jit' "
                             "or 'pmap'.")
  if config.optimizer.schedule not in ('cosine_epoch', 'cosine_step'):
    raise errors.ConfigError(
        f'optimizer.schedule {config.optimizer.schedule!r}: use '
        "'cosine_epoch' (official) or 'cosine_step'.")
  for key in ('num_epochs', 'batch_size', 'eval_batch_size',
              'log_every_steps', 'eval_every_epochs', 'max_to_keep'):
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise errors.ConfigError(f'{key} must be a positive int, got '
                               f'{value!r}.')
  if config.bn_recalibration_batches < 0:
    raise errors.ConfigError('bn_recalibration_batches must be >= 0, got '
                             f'{config.bn_recalibration_batches}.')
  lr = config.optimizer.learning_rate
  if not isinstance(lr, (int, float)) or not np.isfinite(lr) or lr <= 0:
    raise errors.ConfigError('optimizer.learning_rate must be a finite '
                             f'number > 0, got {lr!r}.')


# ----------------------------------------------------------------------------
# Model and optimizer.


def _to_python(value):
  if isinstance(value, list):
    return tuple(_to_python(v) for v in value)
  if isinstance(value, ml_collections.ConfigDict):
    return {k: _to_python(v) for k, v in value.items()}
  return value


def make_runner(config: ml_collections.ConfigDict, devices=None):
  """The config's runner (``parallelism``, ``mesh_shape``, ``mesh_axes``)."""
  return parallel.make_runner(
      config.parallelism, devices=devices,
      mesh_shape=tuple(config.mesh_shape), mesh_axes=tuple(config.mesh_axes))


def create_model(model_config, num_classes: int) -> nn.Module:
  """Builds ``config.model``: a zoo name, or ``'package.module:factory'``.

  The factory is called as ``factory(name?, kind=, num_classes=, dtype=,
  bn_momentum=, **overrides)`` (zoo: :func:`adderjax.models.create_model`).
  A config read from a workdir (:func:`load_config`) may only name the zoo
  unless the user trusts it.

  Raises:
    experiments.errors.ConfigError: the model rejects the config's fields.
  """
  kwargs = dict(kind=model_config.kind, num_classes=num_classes,
                dtype=jnp.dtype(model_config.dtype),
                bn_momentum=model_config.bn_momentum)
  if model_config.grad is not None:
    kwargs['grad'] = model_config.grad
  if model_config.implementation is not None:
    kwargs['implementation'] = model_config.implementation
  kwargs.update(_to_python(model_config.overrides))
  name = model_config.name
  if ':' in name:
    module_name, attr = name.split(':', 1)
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(**kwargs)
  from adderjax import models  # pylint: disable=g-import-not-at-top
  try:
    return models.create_model(name, **kwargs)
  except (TypeError, ValueError, KeyError) as e:
    raise errors.ConfigError(
        f'model {name!r} ({model_config.kind}): '
        f'{" ".join(str(e).split())}') from e


def create_optimizer(config, model: nn.Module, example: jax.Array,
                     steps_per_epoch: int):
  """The paper's optimizer and its learning-rate schedule."""
  from adderjax import optim  # pylint: disable=g-import-not-at-top
  o = config.optimizer
  schedule = optim.cosine_lr_schedule(
      o.learning_rate, num_epochs=config.num_epochs,
      steps_per_epoch=steps_per_epoch,
      per_epoch=o.schedule == 'cosine_epoch')
  mask = optim.adder_mask(model, example, train=False)
  scaling, ilr_factor = o.scaling, o.ilr_factor
  if not any(jax.tree_util.tree_leaves(mask)):
    # A CNN or BNN: no adder kernel for the scaling to act on, so the same
    # SGD without it (addernet_sgd warns about an empty mask otherwise).
    scaling, ilr_factor = 'none', None
  tx = optim.addernet_sgd(
      schedule, mask=mask, momentum=o.momentum,
      weight_decay=o.weight_decay, eta=o.eta, nesterov=o.nesterov,
      scaling=scaling, ilr_factor=ilr_factor)
  return tx, schedule


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


def resolve_remat(remat: str, platform: str) -> str:
  """``config.remat`` for a step compiled for ``platform``.

  ``'auto'`` is ``'layer_outputs'`` on accelerators, where the adder
  kernels cannot take fused producers and memory is what limits the batch
  (TPU v5e, ResNet-20 at 128 images per chip: 74 instead of 89 MB;
  ResNet-50 at 32: 2.04 instead of 2.81 GB), and ``'none'`` on CPU, where
  the recomputation costs time (LeNet-5 on MNIST: 6 % per step) and memory
  is ample. Other values are returned as they are.

  Raises:
    ValueError: an unknown value.
  """
  if remat not in REMAT_CHOICES:
    raise ValueError(f'remat {remat!r}: use one of {REMAT_CHOICES}.')
  if remat == 'auto':
    return 'none' if platform == 'cpu' else 'layer_outputs'
  return remat


def make_init(model: nn.Module, tx: optax.GradientTransformation,
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


def init_host_state(model: nn.Module, tx: optax.GradientTransformation,
                    seed: int, image_shape) -> TrainState:
  """The initial state, as numpy arrays (the same on every process)."""
  init = make_init(model, tx, image_shape)
  state = jax.jit(init)(jax.random.key(seed, impl=PRNG_IMPL))
  return jax.tree.map(np.asarray, jax.device_get(state))


# ----------------------------------------------------------------------------
# Steps.


def normalize(images: jax.Array, mean, std, dtype=jnp.float32) -> jax.Array:
  """``uint8`` images to ``(x / 255 - mean) / std`` in ``dtype``."""
  x = images.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return x.astype(dtype)


def classification_metrics(logits: jax.Array, labels: jax.Array,
                           mask: jax.Array | None = None) -> dict:
  """Sums of cross-entropy, top-1 and top-5 hits, and the example count."""
  logits = logits.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  k = min(5, logits.shape[-1])
  topk = jax.lax.top_k(logits, k)[1]
  top1 = (topk[:, 0] == labels).astype(jnp.float32)
  top5 = jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)
  w = (jnp.ones_like(loss) if mask is None else mask.astype(jnp.float32))
  return {'loss': jnp.sum(loss * w), 'top1': jnp.sum(top1 * w),
          'top5': jnp.sum(top5 * w), 'count': jnp.sum(w)}


def make_train_step(apply_fn: Callable, tx: optax.GradientTransformation,
                    mean, std, dtype=jnp.float32,
                    axis_name: str | None = None,
                    remat: str = 'none') -> Callable:
  """One optimizer step; the same function for jit and pmap.

  Under ``pmap`` (``axis_name`` set), the gradients and BatchNorm statistics
  are averaged over ``axis_name`` with ``lax.pmean`` and metric sums added
  with ``lax.psum``; under ``jit`` the batch is one global array and XLA does
  the reductions.

  ``remat`` (a key of :data:`REMAT_POLICIES`; see :func:`resolve_remat`) is the
  ``jax.checkpoint`` policy of the loss: ``'layer_outputs'`` keeps the
  layers' outputs and recomputes the elementwise ops between them in the
  backward pass (:data:`adderjax.layer_outputs_saveable`); ``'none'`` does
  not wrap the loss.
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f'remat {remat!r}: use one of {sorted(REMAT_POLICIES)}.')
  policy = REMAT_POLICIES[remat]

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    images = normalize(batch['image'], mean, std, dtype)
    labels = batch['label']
    key = jax.random.fold_in(
        jax.random.wrap_key_data(state.rng, impl=PRNG_IMPL), state.step)

    def loss_fn(params):
      logits, updates = apply_fn(
          {'params': params, 'batch_stats': state.batch_stats}, images,
          train=True, mutable=['batch_stats'], rngs={'dropout': key})
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits.astype(jnp.float32), labels).mean()
      return loss, (logits, updates)

    if policy is not None:
      loss_fn = jax.checkpoint(loss_fn, policy=policy)
    (_, (logits, updates)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    grads = parallel.axis_mean(grads, axis_name)
    batch_stats = parallel.axis_mean(
        updates.get('batch_stats', state.batch_stats), axis_name)
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, param_updates)
    metrics = parallel.axis_sum(classification_metrics(logits, labels),
                                axis_name)
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
        classification_metrics(logits, batch['label'], batch['mask']),
        axis_name)
  return step


def make_bn_stats_step(apply_fn: Callable, mean, std, dtype=jnp.float32,
                       axis_name: str | None = None) -> Callable:
  """Batch statistics of one batch with the current weights.

  Runs the model in training mode from zeroed running statistics with
  momentum ``m``: the result is ``(1 - m) * batch_stat``; dividing by
  ``(1 - m)`` is done by the caller from two runs (see
  :func:`recalibrate_batch_stats`).
  """
  def step(state: TrainState, batch: dict) -> PyTree:
    images = normalize(batch['image'], mean, std, dtype)
    zeros = jax.tree.map(jnp.zeros_like, state.batch_stats)
    _, updates = apply_fn({'params': state.params, 'batch_stats': zeros},
                          images, train=True, mutable=['batch_stats'])
    return parallel.axis_mean(updates['batch_stats'], axis_name)
  return step


# ----------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class _Ctx:
  config: Any
  runner: Any
  datasets: data_lib.Datasets
  eval_step: Callable
  bn_stats_step: Callable | None


def evaluate(ctx: _Ctx, state) -> dict[str, float]:
  """Top-1 / top-5 accuracy and loss over the whole evaluation split."""
  totals = None
  for batch in ctx.datasets.eval:
    placed = ctx.runner.put_batch(batch, ctx.config.eval_batch_size)
    m = ctx.eval_step(state, placed)
    totals = m if totals is None else jax.tree.map(jnp.add, totals, m)
  host = ctx.runner.get_metrics(totals)
  count = float(host['count'])
  return {'loss': float(host['loss']) / count,
          'top1': float(host['top1']) / count,
          'top5': float(host['top5']) / count, 'count': count}


def recalibrate_batch_stats(ctx: _Ctx, state, num_batches: int, momentum):
  """Replaces the running statistics by their mean over training batches.

  Uses the first ``num_batches`` batches of epoch 0's order (a fixed sample,
  so the result is deterministic). For each batch the model is run in
  training mode from zero running statistics, giving ``(1 - m) * stat``.
  """
  total = None
  for i in range(num_batches):
    batch = ctx.datasets.train.batch(i % ctx.datasets.train.steps_per_epoch)
    placed = ctx.runner.put_batch(batch, ctx.config.batch_size)
    stats = ctx.bn_stats_step(state, placed)
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
  scale = 1.0 / (num_batches * (1.0 - momentum))
  return state.replace(
      batch_stats=jax.tree.map(lambda t: t * scale, total))


def _print_summary(summary: dict) -> None:
  ev = summary['eval']
  ips = summary['images_per_second']
  speed = (f'{ips:.0f} training images/s' if ips is not None
           else 'no training steps run')
  print(f"== {summary['model']} ({summary['kind']}) on {summary['dataset']}: "
        f"{summary['steps']} steps ({summary['epochs']:.2f} epochs) in "
        f"{summary['wall_seconds']:.1f} s, {speed} ==")
  print(f"Final test accuracy: {100 * ev['top1']:.2f}% (top-5 "
        f"{100 * ev['top5']:.2f}%, loss {ev['loss']:.4f}, "
        f"{int(ev['count'])} images)", flush=True)


SUMMARY_FILE = 'summary.json'


def _read_summary(workdir: str) -> dict | None:
  path = os.path.join(workdir, SUMMARY_FILE)
  try:
    with open(path) as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return None
  return summary if isinstance(summary, dict) else None


def _segments(prior: dict | None) -> list[dict]:
  """The segments of a stored summary (older summaries had just one)."""
  if not prior:
    return []
  if isinstance(prior.get('segments'), list):
    return list(prior['segments'])
  start = prior.get('resumed_from') or 0
  return [{'start_step': start, 'stop_step': prior.get('steps'),
           'wall_seconds': prior.get('wall_seconds'),
           'images_per_second': prior.get('images_per_second'),
           'train_images': None, 'train_seconds': None,
           'finished': True, 'stopped_by': None}]


def _all_finite(tree) -> tuple[bool, str]:
  """Whether every floating leaf is finite, and the first bad leaf's path."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    a = np.asarray(leaf)
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
      return False, jax.tree_util.keystr(path)
  return True, ''


def _resolve_config(config: ml_collections.ConfigDict,
                    datasets: data_lib.Datasets) -> ml_collections.ConfigDict:
  """The config as run: the dataset's name and normalisation filled in."""
  resolved = config.copy_and_resolve_references()
  with resolved.unlocked():
    resolved.dataset.name = datasets.name or config.dataset.name
    resolved.dataset.mean = tuple(datasets.mean)
    resolved.dataset.std = tuple(datasets.std)
  return resolved


def _lock_workdir(workdir: str, primary: bool):
  """Takes the workdir's lock on process 0; all processes agree on it."""
  lock = workdir_lock.WorkdirLock(workdir) if primary else None
  error = None
  if lock is not None:
    try:
      lock.acquire()
    except workdir_lock.WorkdirBusyError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    ok = int(np.min(multihost_utils.process_allgather(
        np.int32(error is None))))
    if not ok and error is None:
      if lock is not None:
        lock.release()
      error = workdir_lock.WorkdirBusyError(
          f'workdir {workdir} is in use by another run (process 0 could not '
          'lock it).')
  if error is not None:
    raise error
  return lock


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       init_from: str | None = None) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming it if it holds a checkpoint).

  One run at a time per workdir (:mod:`experiments.workdir_lock`). The
  config, the data and the model are checked before anything is compiled or
  written; an error leaves the workdir as it was (a workdir created by the
  failed run is removed). SIGTERM and SIGINT save a checkpoint at the next
  step boundary and raise :class:`experiments.errors.Preempted`; running
  again resumes bit-identically. A non-finite training loss or parameter
  raises :class:`experiments.errors.TrainingDivergedError` without saving
  (the last good checkpoint stays). A finished workdir is not trained or
  evaluated again: its stored summary is printed and returned.

  Args:
    config: a config from ``experiments/configs``.
    workdir: directory for checkpoints, metrics and the stored config.
    init_from: a run directory (e.g. a converted official checkpoint) whose
      weights start a new run (fine-tuning); ignored when resuming.

  Returns:
    The summary (also written to ``workdir/summary.json``): final evaluation
    metrics, steps, epochs, wall time and training images per second, and
    one entry per segment (first run and resumptions) under ``segments``.

  Raises:
    experiments.errors.UserError: unknown config keys or bad values
      (:class:`~experiments.errors.ConfigError`), a workdir in use
      (:class:`~experiments.workdir_lock.WorkdirBusyError`) or holding
      another model (:class:`~experiments.checkpointing.WorkdirMismatchError`),
      missing or corrupt data (:class:`experiments.data.DataError`), no
      intact checkpoint (:class:`~experiments.checkpointing.
      CheckpointCorruptError`).
    experiments.errors.Preempted: stopped by a signal, after saving.
    experiments.errors.TrainingDivergedError: the loss became non-finite.
  """
  t_start = time.time()
  validate_config(config)
  primary = parallel.is_primary()
  workdir = os.path.abspath(workdir)
  existed = os.path.isdir(workdir)
  lock = _lock_workdir(workdir, primary)
  try:
    with preemption.StopRequest() as stop:
      return _train_locked(config, workdir, primary, t_start, stop,
                           init_from)
  finally:
    if lock is not None:
      lock.release()
    if not existed and primary:
      try:
        os.rmdir(workdir)  # only if the failed run left it empty
      except OSError:
        pass


def _train_locked(config, workdir, primary, t_start, stop, init_from=None):
  """The body of :func:`train_and_evaluate`, with the workdir locked."""
  ckpt = checkpointing.Checkpointer(workdir, max_to_keep=config.max_to_keep,
                                    async_save=config.async_checkpointing,
                                    primary=primary)
  # Everything read-only first: the stored config, the data, the model.
  ckpt.stored_config()
  try:
    runner = make_runner(config)  # a mesh the devices do not fit
    rows = runner.local_rows(config.batch_size)
    eval_rows = runner.local_rows(config.eval_batch_size)
  except ValueError as e:  # ... or do not divide a batch size
    raise errors.ConfigError(str(e)) from e
  datasets = data_lib.build_datasets(
      config.dataset, seed=config.seed, global_batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size, rows=rows, eval_rows=eval_rows)
  config = _resolve_config(config, datasets)
  ckpt.check_config(config)
  if config.steps_per_epoch > 0:
    datasets.train.steps_per_epoch = min(config.steps_per_epoch,
                                         datasets.train.steps_per_epoch)
  steps_per_epoch = datasets.train.steps_per_epoch
  total_steps = config.num_epochs * steps_per_epoch
  stop_step = (min(total_steps, config.num_train_steps)
               if config.num_train_steps > 0 else total_steps)

  model = create_model(config.model, datasets.num_classes)
  example = jnp.zeros((1,) + datasets.image_shape)
  tx, schedule = create_optimizer(config, model, example, steps_per_epoch)
  host_state = init_host_state(model, tx, config.seed, datasets.image_shape)

  data_state = {'seed': config.seed, 'steps_per_epoch': steps_per_epoch,
                'global_batch_size': config.batch_size,
                'num_train_examples': len(datasets.train.source)}
  latest, host_state, saved, corrupt = ckpt.restore_newest_intact(host_state)
  resumed = latest is not None
  if resumed:
    for key, value in data_state.items():
      if saved.get(key) != value:
        raise checkpointing.WorkdirMismatchError(
            f'checkpoint {latest} in {workdir} was written with {key}='
            f'{saved.get(key)!r}, this run has {value!r}; the data stream '
            'would differ. Use a new --workdir (nothing was overwritten).')
    logging.info('Resuming from checkpoint at step %d.', int(host_state.step))
  elif init_from:
    from experiments import convert_official  # pylint: disable=g-import-not-at-top
    host_state = convert_official.init_state_from_workdir(init_from,
                                                          host_state, tx)
  start_step = int(host_state.step)
  prior = _read_summary(workdir) if resumed else None
  if (resumed and start_step >= stop_step and not corrupt and prior and
      prior.get('finished', True) and prior.get('steps') == stop_step and
      prior.get('eval')):
    # A finished run: nothing to train or evaluate, nothing to write.
    ckpt.close()
    logging.info('%s already holds the finished run (step %d).', workdir,
                 stop_step)
    if primary:
      _print_summary(prior)
    return prior
  if corrupt:
    moved = ckpt.quarantine([step for step, _ in corrupt])
    for path in moved:
      logging.warning('Moved a corrupt checkpoint to %s.', path)
  ckpt.write_config(config)

  dtype = jnp.dtype(config.model.dtype)
  mean, std = datasets.mean, datasets.std
  axis = runner.axis_name
  train_step = runner.compile_train(
      make_train_step(model.apply, tx, mean, std, dtype, axis,
                      remat=resolve_remat(config.remat, runner.platform)))
  ctx = _Ctx(config=config, runner=runner, datasets=datasets,
             eval_step=runner.compile_eval(
                 make_eval_step(model.apply, mean, std, dtype, axis)),
             bn_stats_step=(runner.compile_eval(make_bn_stats_step(
                 model.apply, mean, std, dtype, axis))
                            if config.bn_recalibration_batches > 0 else None))
  state = runner.put_state(host_state)
  del host_state

  writer = metrics_lib.MetricWriter(
      workdir, enabled=primary, tensorboard=config.tensorboard,
      resume_step=start_step if resumed else None)
  ckpt_every = (config.checkpoint_every_steps
                if config.checkpoint_every_steps > 0 else steps_per_epoch)

  def run_eval(state, step):
    if config.bn_recalibration_batches > 0:
      state = recalibrate_batch_stats(ctx, state,
                                      config.bn_recalibration_batches,
                                      config.model.bn_momentum)
    result = evaluate(ctx, state)
    if not writer.has_record(step, 'eval/'):
      writer.write(step, {f'eval/{k}': v for k, v in result.items()
                          if k != 'count'})
    logging.info('step %d eval: %s', step, result)
    return state, result

  # Metric sums since the last log line; carried through checkpoints so that
  # a resumed run logs exactly what an uninterrupted one does.
  window, window_steps = None, 0
  if resumed and saved.get('window') is not None:
    window = {k: np.float32(v) for k, v in saved['window'].items()}
    window_steps = int(saved.get('window_steps', 0))
  window_first = start_step - window_steps + 1

  def diverged(what, step):
    last = ckpt.latest_step()
    where = (f'the last good checkpoint is step {last} in {ckpt.directory}'
             if last is not None else 'no checkpoint was written')
    return errors.TrainingDivergedError(
        f'training diverged: {what} at step {step}; stopped without saving '
        f'({where}). Lower --config.optimizer.learning_rate or check the '
        'data.')

  def save(state, step, window, window_steps, force=False):
    host = runner.get_state(state)
    ok, leaf = _all_finite(host.params)
    if not ok:
      raise diverged(f'parameter {leaf} is not finite', step)
    host_window = None
    if window is not None:
      host_window = {k: float(np.float32(v)) for k, v in
                     runner.get_metrics(window).items()}
      if not np.isfinite(host_window['loss']):
        raise diverged(f'the training loss is {host_window["loss"]}', step)
    ckpt.save(step, host, dict(data_state, step=step,
                               epoch=step / steps_per_epoch,
                               window=host_window,
                               window_steps=window_steps), force=force)

  progress = None
  if primary and config.progress_bar and stop_step > start_step:
    import tqdm  # pylint: disable=g-import-not-at-top
    progress = tqdm.tqdm(total=stop_step, initial=start_step, unit='step',
                         dynamic_ncols=True, desc='train')

  window_start = time.time()
  train_images, train_seconds, first_window = 0, 0.0, True
  last_eval, last_eval_step = None, None
  signum, done = 0, start_step
  try:
    for step, batch in zip(range(start_step, stop_step),
                           datasets.train.iterate(start_step, stop_step)):
      placed = runner.put_batch(batch, config.batch_size)
      state, m = train_step(state, placed)
      window = m if window is None else jax.tree.map(jnp.add, window, m)
      window_steps += 1
      done = step + 1
      if progress is not None:
        progress.update(1)
      if done % config.log_every_steps == 0 or done == stop_step:
        host = runner.get_metrics(window)
        elapsed = time.time() - window_start
        ips = window_steps * config.batch_size / max(elapsed, 1e-9)
        if not first_window or done == stop_step:
          # The first window holds compilation: left out of the throughput
          # unless it is the only one.
          train_images += window_steps * config.batch_size
          train_seconds += elapsed
        first_window = False
        count = float(host['count'])
        scalars = {'train/loss': float(host['loss']) / count,
                   'train/top1': float(host['top1']) / count,
                   'train/top5': float(host['top5']) / count,
                   'train/learning_rate': float(schedule(step)),
                   'train/images_per_second': ips,
                   'train/epoch': done / steps_per_epoch}
        writer.write(done, scalars)
        if not np.isfinite(scalars['train/loss']):
          raise diverged(f'the mean training loss of steps {window_first}-'
                         f'{done} is {scalars["train/loss"]}', done)
        if progress is not None:
          progress.set_postfix(loss=f"{scalars['train/loss']:.4f}",
                               top1=f"{scalars['train/top1']:.3f}",
                               ips=f'{ips:.0f}')
        window, window_steps, window_first = None, 0, done + 1
        window_start = time.time()
      if done % steps_per_epoch == 0 and (
          (done // steps_per_epoch) % config.eval_every_epochs == 0):
        state, last_eval = run_eval(state, done)
        last_eval_step = done
        if progress is not None:
          progress.write(f'epoch {done // steps_per_epoch}: test top-1 '
                         f'{100 * last_eval["top1"]:.2f}%, loss '
                         f'{last_eval["loss"]:.4f}')
        window_start = time.time()
      signum = stop.poll() if done != stop_step else 0
      if done != stop_step and (done % ckpt_every == 0 or signum):
        save(state, done, window, window_steps, force=bool(signum))
        window_start = time.time() if window is None else window_start
      ckpt.poll()
      if signum:
        break
    if progress is not None:
      progress.close()
      progress = None

    if not signum:
      if last_eval_step != stop_step:
        state, last_eval = run_eval(state, stop_step)
      if ckpt.latest_step() != stop_step:
        save(state, stop_step, None, 0, force=True)
  finally:
    if progress is not None:
      progress.close()
    ckpt.close()
    writer.close()

  wall = time.time() - t_start
  segment = {'start_step': start_step, 'stop_step': done,
             'wall_seconds': wall,
             'images_per_second': (train_images / train_seconds
                                   if train_seconds > 0 else None),
             'train_images': train_images, 'train_seconds': train_seconds,
             'finished': not signum,
             'stopped_by': errors.signal_name(signum) if signum else None}
  segments = _segments(prior) + [segment]
  images = [g['train_images'] for g in segments]
  seconds = [g['train_seconds'] for g in segments]
  if all(v is not None for v in images + seconds) and sum(seconds) > 0:
    ips = sum(images) / sum(seconds)
  else:
    ips = segment['images_per_second']
  summary = {
      'model': config.model.name, 'kind': config.model.kind,
      'dataset': config.dataset.name,
      'dataset_verified': datasets.verified,
      'data_dir': (config.dataset.data_dir
                   if config.dataset.name in ('mnist', 'idx') else
                   config.dataset.tfds_data_dir),
      'normalization': {'mean': list(datasets.mean),
                        'std': list(datasets.std)},
      'steps': done, 'epochs': done / steps_per_epoch,
      'finished': not signum,
      'wall_seconds': sum(g['wall_seconds'] or 0.0 for g in segments),
      'images_per_second': ips,
      'resumed_from': start_step if resumed else None,
      'segments': segments,
      'devices': jax.device_count(), 'processes': jax.process_count(),
      'eval': last_eval,
  }
  if primary:
    tmp = os.path.join(workdir, SUMMARY_FILE + '.tmp')
    with open(tmp, 'w') as f:
      json.dump(summary, f, indent=2)
    os.replace(tmp, os.path.join(workdir, SUMMARY_FILE))
  if signum:
    raise errors.Preempted(
        signum, done, f'{errors.signal_name(signum)}: saved checkpoint '
        f'{done} in {ckpt.directory} and stopped; run the same command to '
        'resume.')
  if primary:
    _print_summary(summary)
  return summary


class UntrustedCodeError(errors.UserError, PermissionError):
  """A workdir's config names code to import, and it is not trusted."""


def load_config(workdir: str,
                trust_code: bool = False) -> ml_collections.ConfigDict:
  """The config a run stored in ``workdir/config.json``.

  Args:
    workdir: the run directory.
    trust_code: allow ``model.name='module:factory'``, which imports that
      module and calls the factory when the model is built. A workdir may
      come from someone else: by default only the model zoo is allowed.

  Raises:
    experiments.errors.UserError: no run in ``workdir``, an unreadable
      config.json, or a ``module:factory`` model without ``trust_code``.
  """
  path = os.path.join(workdir, checkpointing.CONFIG_FILE)
  if not os.path.exists(path):
    raise checkpointing.NoRunError(f'{path} not found: {workdir} holds no '
                                   'run.')
  from experiments.configs import default  # pylint: disable=g-import-not-at-top
  try:
    with open(path) as f:
      stored = json.load(f)
    if not isinstance(stored, dict):
      raise ValueError('not a JSON object')
  except ValueError as e:
    raise checkpointing.WorkdirMismatchError(
        f'{path} is not a valid config ({e}).') from e
  name = stored.get('model', {}).get('name', '')
  if isinstance(name, str) and ':' in name and not trust_code:
    raise UntrustedCodeError(
        f"{path} sets model.name={name!r}, which would import module "
        f"{name.split(':')[0]!r} and run its code; a workdir's config may "
        'only name a model of the zoo. Pass --trust_workdir_code if you '
        'trust this workdir.')
  config = default.get_config()
  overrides = stored.get('model', {}).pop('overrides', {})
  flat = checkpointing.flatten(stored)
  with config.unlocked():
    for key, value in flat.items():
      *parents, leaf = key.split('.')
      node = config
      for p in parents:
        node = node[p]
      node[leaf] = _to_python(value) if isinstance(value, list) else value
    config.model.overrides = ml_collections.ConfigDict(
        {k: _to_python(v) for k, v in overrides.items()})
  return config


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        step: int | None = None) -> dict[str, Any]:
  """Evaluates a checkpoint of ``workdir`` on ``config.dataset.eval_split``.

  Args:
    config: the run's config (see :func:`load_config`); data paths, the
      eval split and batch size may differ from training.
    workdir: the run directory.
    step: checkpoint step (default: the newest).

  Returns:
    ``{'step', 'loss', 'top1', 'top5', 'count'}``.

  Raises:
    experiments.checkpointing.CheckpointCorruptError: checkpoint ``step``
      fails its checksums (with ``step=None``: every checkpoint does; a
      corrupt newest one falls back to the newest intact one).
  """
  validate_config(config)
  # The checkpoint's checksums first: a corrupt one fails before compiling.
  ckpt = checkpointing.Checkpointer(workdir, primary=False)
  if step is None:
    step = ckpt.newest_verified_step()
    if step is None:
      raise checkpointing.NoRunError(f'no checkpoint in {ckpt.directory}.')
  else:
    ckpt.verify(step)
  runner = make_runner(config)
  datasets = data_lib.build_datasets(
      config.dataset, seed=config.seed, global_batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size,
      rows=runner.local_rows(config.batch_size),
      eval_rows=runner.local_rows(config.eval_batch_size))
  if config.steps_per_epoch > 0:
    datasets.train.steps_per_epoch = min(config.steps_per_epoch,
                                         datasets.train.steps_per_epoch)
  model = create_model(config.model, datasets.num_classes)
  example = jnp.zeros((1,) + datasets.image_shape)
  tx, _ = create_optimizer(config, model, example,
                           datasets.train.steps_per_epoch)
  target = init_host_state(model, tx, config.seed, datasets.image_shape)
  host_state, _ = ckpt.restore(step, target)
  ckpt.close()
  dtype = jnp.dtype(config.model.dtype)
  axis = runner.axis_name
  ctx = _Ctx(config=config, runner=runner, datasets=datasets,
             eval_step=runner.compile_eval(make_eval_step(
                 model.apply, datasets.mean, datasets.std, dtype, axis)),
             bn_stats_step=runner.compile_eval(make_bn_stats_step(
                 model.apply, datasets.mean, datasets.std, dtype, axis)))
  state = runner.put_state(host_state)
  if config.bn_recalibration_batches > 0:
    state = recalibrate_batch_stats(ctx, state,
                                    config.bn_recalibration_batches,
                                    config.model.bn_momentum)
  result = evaluate(ctx, state)
  result['step'] = int(step)
  return result
