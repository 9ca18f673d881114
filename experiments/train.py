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
accuracy (PAPER.md section 8: 45.9 % vs 90.7 % after epoch 1). It is a
property of the running averages, not of the weights: it fades as the
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

from experiments import checkpointing
from experiments import data as data_lib
from experiments import metrics as metrics_lib
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
    raise ValueError(f'unknown config key(s) {unknown}; valid keys are in '
                     'experiments/configs/default.py.')
  missing = sorted(known - _flat_keys(config))
  if missing:
    raise ValueError(f'config lacks key(s) {missing}; derive configs from '
                     'experiments/configs/default.py.')
  if config.model.kind not in ('cnn', 'adder', 'bnn'):
    raise ValueError(f"model.kind {config.model.kind!r}: use 'cnn', 'adder' "
                     "or 'bnn'.")
  if config.parallelism not in ('jit', 'pmap'):
    raise ValueError(f"parallelism {config.parallelism!r}: use 'jit' or "
                     "'pmap'.")
  if config.optimizer.schedule not in ('cosine_epoch', 'cosine_step'):
    raise ValueError(f'optimizer.schedule {config.optimizer.schedule!r}: use '
                     "'cosine_epoch' (official) or 'cosine_step'.")
  for key in ('num_epochs', 'batch_size', 'eval_batch_size',
              'log_every_steps', 'eval_every_epochs', 'max_to_keep'):
    value = config[key]
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f'{key} must be a positive int, got {value!r}.')
  if config.bn_recalibration_batches < 0:
    raise ValueError('bn_recalibration_batches must be >= 0, got '
                     f'{config.bn_recalibration_batches}.')


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
  return models.create_model(name, **kwargs)


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
                    axis_name: str | None = None) -> Callable:
  """One optimizer step; the same function for jit and pmap.

  Under ``pmap`` (``axis_name`` set), the gradients and BatchNorm statistics
  are averaged over ``axis_name`` with ``lax.pmean`` and metric sums added
  with ``lax.psum``; under ``jit`` the batch is one global array and XLA does
  the reductions.
  """
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       init_from: str | None = None) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming it if it holds a checkpoint).

  Args:
    config: a config from ``experiments/configs``.
    workdir: directory for checkpoints, metrics and the stored config.
    init_from: a run directory (e.g. a converted official checkpoint) whose
      weights start a new run (fine-tuning); ignored when resuming.

  Returns:
    The summary (also written to ``workdir/summary.json``): final evaluation
    metrics, steps, epochs, wall time and training images per second.

  Raises:
    ValueError: unknown config keys or bad values, a batch size the devices
      do not divide, a workdir holding another model
      (:class:`experiments.checkpointing.WorkdirMismatchError`), missing or
      corrupt data (:class:`experiments.data.DataError`).
  """
  t_start = time.time()
  validate_config(config)
  primary = parallel.is_primary()
  ckpt = checkpointing.Checkpointer(workdir, max_to_keep=config.max_to_keep,
                                    async_save=config.async_checkpointing,
                                    primary=primary)
  ckpt.check_config(config)  # before anything is written

  runner = make_runner(config)
  rows = runner.local_rows(config.batch_size)
  eval_rows = runner.local_rows(config.eval_batch_size)
  datasets = data_lib.build_datasets(
      config.dataset, seed=config.seed, global_batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size, rows=rows, eval_rows=eval_rows)
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
  latest = ckpt.latest_step()
  resumed = latest is not None
  if resumed:
    host_state, saved = ckpt.restore(latest, host_state)
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
  ckpt.write_config(config)
  start_step = int(host_state.step)

  dtype = jnp.dtype(config.model.dtype)
  mean, std = datasets.mean, datasets.std
  axis = runner.axis_name
  train_step = runner.compile_train(
      make_train_step(model.apply, tx, mean, std, dtype, axis))
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
    writer.write(step, {f'eval/{k}': v for k, v in result.items()
                        if k != 'count'})
    logging.info('step %d eval: %s', step, result)
    return state, result

  def save(state, step, force=False):
    host = runner.get_state(state)
    ckpt.save(step, host, dict(data_state, step=step,
                               epoch=step / steps_per_epoch), force=force)

  progress = None
  if primary and config.progress_bar and stop_step > start_step:
    import tqdm  # pylint: disable=g-import-not-at-top
    progress = tqdm.tqdm(total=stop_step, initial=start_step, unit='step',
                         dynamic_ncols=True, desc='train')

  window, window_steps, window_start = None, 0, time.time()
  train_images, train_seconds, first_window = 0, 0.0, True
  last_eval, last_eval_step = None, None
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
      if progress is not None:
        progress.set_postfix(loss=f"{scalars['train/loss']:.4f}",
                             top1=f"{scalars['train/top1']:.3f}",
                             ips=f'{ips:.0f}')
      window, window_steps = None, 0
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
    if done % ckpt_every == 0 and done != stop_step:
      save(state, done)
      window_start = time.time() if window is None else window_start
  if progress is not None:
    progress.close()

  if last_eval_step != stop_step:
    state, last_eval = run_eval(state, stop_step)
  if ckpt.latest_step() != stop_step:
    save(state, stop_step, force=True)
  ckpt.close()
  writer.close()

  summary = {
      'model': config.model.name, 'kind': config.model.kind,
      'dataset': config.dataset.name, 'steps': stop_step,
      'epochs': stop_step / steps_per_epoch,
      'wall_seconds': time.time() - t_start,
      'images_per_second': (train_images / train_seconds
                            if train_seconds > 0 else None),
      'resumed_from': start_step if resumed else None,
      'devices': jax.device_count(), 'processes': jax.process_count(),
      'eval': last_eval,
  }
  if primary:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2)
    _print_summary(summary)
  return summary


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run stored in ``workdir/config.json``."""
  path = os.path.join(workdir, checkpointing.CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: {workdir} holds no run.')
  from experiments.configs import default  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    stored = json.load(f)
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
  """
  validate_config(config)
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
  ckpt = checkpointing.Checkpointer(workdir, primary=False)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {ckpt.directory}.')
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
