"""Running one training of the reproduction and reading back what it made.

A run is ``experiments.train.train_and_evaluate(config, workdir)`` in a fresh
workdir. Afterwards this module reads the run's per-step metrics
(``metrics.jsonl``) as learning curves, restores the final parameters from
the final checkpoint, and evaluates on the whole test set where the run's
own evaluations used a subset.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from adderjax import optim
from experiments import checkpointing
from experiments import data as data_lib
from experiments import metrics as metrics_lib
from experiments import experiment
from experiments import steps
from experiments import train
from experiments.reproduce_lib import analysis


@dataclasses.dataclass
class RunResult:
  """What one run produced.

  Attributes:
    name: the run's name (also its workdir's name).
    config: the run's config as a plain dict.
    wall_seconds: wall time of the training (compilation and evaluations
      included).
    images_per_second: training throughput (compilation left out).
    seconds_per_epoch: ``train_examples / images_per_second``.
    train_curve: ``[(epoch, loss, top1)]`` averaged over each logging window.
    eval_curve: ``[(epoch, loss, top1)]`` of the run's own evaluations.
    final: ``{'top1', 'loss', 'count'}`` on the whole test set (the BN
      statistics the run ended with).
    extra: other evaluations (e.g. ``'recalibrated'``).
    params: final parameters (numpy), not serialised.
    batch_stats: final BatchNorm statistics (numpy), not serialised.
  """
  name: str
  config: dict[str, Any]
  wall_seconds: float
  images_per_second: float
  seconds_per_epoch: float
  train_curve: list[tuple[float, float, float]]
  eval_curve: list[tuple[float, float, float]]
  final: dict[str, float]
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)
  params: Any = None
  batch_stats: Any = None

  def to_json(self) -> dict[str, Any]:
    """Everything but the arrays, as JSON-serialisable values."""
    out = dataclasses.asdict(
        dataclasses.replace(self, params=None, batch_stats=None))
    out.pop('params')
    out.pop('batch_stats')
    return out


def read_curves(workdir: str, steps_per_epoch: int):
  """Training and evaluation curves from ``workdir/metrics.jsonl``.

  Args:
    workdir: the run directory.
    steps_per_epoch: steps of one pass over the training set (to express
      steps in epochs).

  Returns:
    ``(train_curve, eval_curve)``, lists of ``(epoch, loss, top1)``.
  """
  path = os.path.join(workdir, metrics_lib.METRICS_FILE)
  train_curve, eval_curve = [], []
  with open(path) as f:
    for line in f:
      record = json.loads(line)
      epoch = record['step'] / steps_per_epoch
      if 'train/loss' in record:
        train_curve.append((epoch, record['train/loss'],
                            record['train/top1']))
      if 'eval/top1' in record:
        eval_curve.append((epoch, record['eval/loss'], record['eval/top1']))
  return train_curve, eval_curve


def _plain_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def evaluate_on_test(config: ml_collections.ConfigDict, workdir: str, *,
                     recalibration_batches: int = 0) -> dict[str, float]:
  """Full-test-set accuracy of the final checkpoint of ``workdir``.

  Uses :func:`experiments.train.evaluate_checkpoint` with the evaluation
  subset removed; ``recalibration_batches > 0`` first recomputes the
  BatchNorm statistics from that many training batches.
  """
  c = copy.deepcopy(config)
  c.dataset.max_eval_examples = -1
  c.bn_recalibration_batches = int(recalibration_batches)
  result = train.evaluate_checkpoint(c, workdir)
  return {k: float(result[k]) for k in ('top1', 'loss', 'count')}


def run(name: str, config: ml_collections.ConfigDict, workdir_root: str, *,
        steps_per_epoch: int, train_examples: int,
        recalibrated_eval: bool = False,
        recalibration_batches: int = 20, log=print) -> RunResult:
  """Trains ``config`` in ``workdir_root/name`` and collects its results.

  Args:
    name: run name (a new directory under ``workdir_root``).
    config: a config from :func:`experiments.reproduce_lib.plan.make_config`.
    workdir_root: parent of the run directories.
    steps_per_epoch: steps of one pass over the training set.
    train_examples: training examples (for seconds per epoch).
    recalibrated_eval: also evaluate with BatchNorm statistics recomputed
      from ``recalibration_batches`` training batches (``extra``).
    recalibration_batches: see ``recalibrated_eval``.
    log: where progress lines go.

  Returns:
    A :class:`RunResult`.

  Raises:
    FileExistsError: the run directory exists and is not empty (a run is
      never resumed: its wall time would not be one run's).
  """
  workdir = os.path.join(workdir_root, name)
  if os.path.isdir(workdir) and os.listdir(workdir):
    raise FileExistsError(f'{workdir} is not empty; the reproduction starts '
                          'every run afresh. Use another --workdir.')
  log(f'[{time.strftime("%H:%M:%S")}] run {name}: {config.num_epochs} '
      f'epoch(s) of {config.steps_per_epoch} steps (-1: all), seed '
      f'{config.seed}')
  t0 = time.time()
  summary = train.train_and_evaluate(config, workdir)
  wall = time.time() - t0
  train_curve, eval_curve = read_curves(workdir, steps_per_epoch)
  if config.dataset.max_eval_examples > 0:
    final = evaluate_on_test(config, workdir)
  else:
    ev = summary['eval']
    final = {k: float(ev[k]) for k in ('top1', 'loss', 'count')}
  extra = {}
  if recalibrated_eval:
    extra['recalibrated'] = evaluate_on_test(
        config, workdir, recalibration_batches=recalibration_batches)
  ckpt = checkpointing.Checkpointer(workdir, primary=False)
  state, _ = ckpt.restore_saved()
  ckpt.close()
  ips = summary.get('images_per_second')
  ips = float(ips) if ips is not None else float('nan')
  result = RunResult(
      name=name, config=_plain_config(config), wall_seconds=wall,
      images_per_second=ips,
      seconds_per_epoch=(train_examples / ips if ips > 0 else float('nan')),
      train_curve=train_curve, eval_curve=eval_curve, final=final,
      extra=extra, params=jax.tree.map(np.asarray, state['params']),
      batch_stats=jax.tree.map(np.asarray, state['batch_stats']))
  log(f'[{time.strftime("%H:%M:%S")}] run {name}: test top-1 '
      f'{100 * final["top1"]:.2f}% in {wall:.0f} s '
      f'({result.seconds_per_epoch:.1f} s/epoch)')
  return result


def _test_images(config) -> tuple[np.ndarray, np.ndarray]:
  src = data_lib.load_mnist_split(config.dataset.data_dir,
                                  config.dataset.eval_split)
  return src.images, src.labels


def test_features(config: ml_collections.ConfigDict, result: RunResult,
                  batch_size: int = 1000) -> dict[str, np.ndarray]:
  """The sown ``'features'`` of a run's final model on the whole test set.

  Args:
    config: the run's config (its model must ``sow`` ``'features'``).
    result: the run (its final parameters and BatchNorm statistics).
    batch_size: evaluation batch.

  Returns:
    ``{'features': [N, D], 'labels': [N], 'predictions': [N]}``.
  """
  # The model and the normalisation the run trained with (MNIST's, or the
  # training set's own for other IDX data).
  norm = experiment.Experiment.from_config(config)
  model = norm.model
  images, labels = _test_images(config)
  variables = {'params': result.params, 'batch_stats': result.batch_stats}

  @jax.jit
  def apply(variables, x):
    x = steps.normalize(x, norm.mean, norm.std)
    logits, inter = model.apply(variables, x, train=False,
                                mutable=['intermediates'])
    return logits, inter['intermediates']['features'][0]

  feats, preds = [], []
  for i in range(0, len(images), batch_size):
    x = images[i:i + batch_size]
    pad = batch_size - len(x)
    if pad:
      x = np.concatenate([x, np.repeat(x[:1], pad, axis=0)])
    logits, f = apply(variables, x)
    keep = batch_size - pad
    feats.append(np.asarray(f)[:keep])
    preds.append(np.asarray(jnp.argmax(logits, -1))[:keep])
  return {'features': np.concatenate(feats), 'labels': labels,
          'predictions': np.concatenate(preds)}


def initial_adaptive_scales(config: ml_collections.ConfigDict
                            ) -> dict[str, float]:
  """The adaptive LR's per-layer scales at initialisation, on batch 0.

  Builds the config's model and data, initialises with the config's seed,
  takes the gradient of the training loss on the first training batch (as
  the first training step does) and returns ``eta * sqrt(k) / ||g||`` per
  adder kernel (:func:`analysis.adaptive_scales`).
  """
  datasets = data_lib.build_datasets(
      config.dataset, seed=config.seed, global_batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size)
  model = experiment.create_model(config.model, datasets.num_classes)
  host = steps.init_host_state(model, optax.identity(), config.seed,
                               datasets.image_shape)
  example = jnp.zeros((1,) + datasets.image_shape)
  mask = optim.adder_mask(model, example, train=False)
  batch = datasets.train.batch(0)
  images = steps.normalize(batch['image'], datasets.mean, datasets.std)

  @jax.jit
  def grads(params, batch_stats):
    def loss_fn(p):
      logits, _ = model.apply({'params': p, 'batch_stats': batch_stats},
                              images, train=True, mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, batch['label']).mean()
    return jax.grad(loss_fn)(params)

  g = grads(host.params, host.batch_stats)
  return analysis.adaptive_scales(jax.device_get(g), mask,
                                  eta=config.optimizer.eta)
