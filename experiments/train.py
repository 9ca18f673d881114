"""The training loop of every experiment: ``train_and_evaluate(config, workdir)``.

:class:`experiments.experiment.Experiment` builds everything from the config
(data, model, optimizer, objective, runner, compiled steps); this module runs
it: restore or initialise the state, then step and hand each step to the
periodic duties of :mod:`experiments.duties` (metrics, evaluation, progress
bar, preemption, checkpoints). A new training method is a config and a loss
term (:mod:`experiments.losses`), never an edit of this loop.

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
  >>> import tempfile
  >>> from experiments.configs import lenet5_mnist
  >>> c = lenet5_mnist.get_config('runlocal')
  >>> train_and_evaluate(c, tempfile.mkdtemp())  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from experiments import checkpointing
from experiments import duties as duties_lib
from experiments import errors
from experiments import metrics as metrics_lib
from experiments import parallel
from experiments import preemption
from experiments import workdir_lock
from experiments.experiment import Experiment
from experiments.experiment import init_state_from_workdir
from experiments.experiment import validate_config

SUMMARY_FILE = 'summary.json'


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
  with checkpointing.Checkpointer(
      workdir, max_to_keep=config.max_to_keep,
      async_save=config.async_checkpointing, primary=primary) as ckpt:
    return _train_with(config, workdir, primary, t_start, stop, init_from,
                       ckpt)


def _train_with(config, workdir, primary, t_start, stop, init_from, ckpt):
  """Restores or initialises the state, then runs the loop and its duties."""
  # Everything read-only first: the stored config, the data, the model.
  ckpt.stored_config()
  exp = Experiment.from_config(config)
  config = exp.config
  ckpt.check_config(config)
  host_state = exp.init_host_state()
  latest, host_state, saved, corrupt = ckpt.restore_newest_intact(host_state)
  resumed = latest is not None
  if resumed:
    for key, value in exp.data_state.items():
      if saved.get(key) != value:
        raise checkpointing.WorkdirMismatchError(
            f'checkpoint {latest} in {workdir} was written with {key}='
            f'{saved.get(key)!r}, this run has {value!r}; the data stream '
            'would differ. Use a new --workdir (nothing was overwritten).')
    logging.info('Resuming from checkpoint at step %d.', int(host_state.step))
  elif init_from:
    host_state = init_state_from_workdir(init_from, host_state, exp.tx)
  start_step = int(host_state.step)
  prior = _read_summary(workdir) if resumed else None
  if (resumed and start_step >= exp.stop_step and not corrupt and prior and
      prior.get('finished', True) and prior.get('steps') == exp.stop_step
      and prior.get('eval')):
    # A finished run: nothing to train or evaluate, nothing to write.
    ckpt.close()
    logging.info('%s already holds the finished run (step %d).', workdir,
                 exp.stop_step)
    if primary:
      _print_summary(prior)
    return prior
  if corrupt:
    for path in ckpt.quarantine([step for step, _ in corrupt]):
      logging.warning('Moved a corrupt checkpoint to %s.', path)
  ckpt.write_config(config)

  loop = duties_lib.LoopState(state=exp.runner.put_state(host_state),
                              step=start_step, start_step=start_step,
                              stop_step=exp.stop_step)
  del host_state
  writer = metrics_lib.MetricWriter(
      workdir, enabled=primary, tensorboard=config.tensorboard,
      resume_step=start_step if resumed else None)
  window = duties_lib.MetricsWindow(
      exp.runner, writer, exp.schedule, config.batch_size,
      exp.steps_per_epoch, config.log_every_steps, ckpt,
      saved_window=saved.get('window') if resumed else None,
      saved_window_steps=saved.get('window_steps', 0) if resumed else 0,
      start_step=start_step)
  duties = [window, duties_lib.Evaluation(
      exp.evaluate_state, writer, exp.steps_per_epoch,
      config.eval_every_epochs, window)]
  if primary and config.progress_bar and exp.stop_step > start_step:
    duties.append(duties_lib.ProgressBar(window, start_step, exp.stop_step,
                                         exp.steps_per_epoch))
  ckpt_every = (config.checkpoint_every_steps
                if config.checkpoint_every_steps > 0 else exp.steps_per_epoch)
  duties += [duties_lib.Preemption(stop, start_step), duties_lib.Checkpointing(
      ckpt, exp.runner, ckpt_every, exp.data_state, exp.steps_per_epoch,
      window)]
  try:
    run_loop(exp, loop, duties)
  finally:
    for duty in duties:
      duty.close()
    ckpt.close()
    writer.close()
  return _finish(exp, workdir, primary, loop, window, prior, resumed,
                 time.time() - t_start, ckpt.directory)


def run_loop(exp: Experiment, loop: duties_lib.LoopState, duties) -> None:
  """Steps from ``loop.step`` to ``loop.stop_step``, running the duties.

  Stops early when a duty sets ``loop.signum`` (a stop signal); otherwise
  every duty's ``finish`` runs after the last step.
  """
  start = loop.step
  for step, batch in zip(range(start, loop.stop_step),
                         exp.train_batches(start, loop.stop_step)):
    loop.state, metrics = exp.train_step(loop.state, exp.put_batch(batch))
    loop.step = step + 1
    duties_lib.run_duties(loop, duties, metrics)
    if loop.signum:
      return
  for duty in duties:
    duty.finish(loop)


def _finish(exp, workdir, primary, loop, window, prior, resumed, wall,
            ckpt_dir) -> dict[str, Any]:
  """Writes and prints the summary; raises Preempted after a signal."""
  config, signum, done = exp.config, loop.signum, loop.step
  segment = {'start_step': loop.start_step, 'stop_step': done,
             'wall_seconds': wall,
             'images_per_second': (window.train_images / window.train_seconds
                                   if window.train_seconds > 0 else None),
             'train_images': window.train_images,
             'train_seconds': window.train_seconds,
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
      'dataset_verified': exp.datasets.verified,
      'data_dir': (config.dataset.data_dir
                   if config.dataset.name in ('mnist', 'idx') else
                   config.dataset.tfds_data_dir),
      'normalization': {'mean': list(exp.mean), 'std': list(exp.std)},
      'steps': done, 'epochs': done / exp.steps_per_epoch,
      'finished': not signum,
      'wall_seconds': sum(g['wall_seconds'] or 0.0 for g in segments),
      'images_per_second': ips,
      'resumed_from': loop.start_step if resumed else None,
      'segments': segments,
      'devices': jax.device_count(), 'processes': jax.process_count(),
      'eval': loop.last_eval,
  }
  if loop.last_eval:
    # A method's extra figures ('teacher/top1', ...) under their own key
    # ('teacher_eval'); 'eval' is the trained network's.
    own, extra = {}, {}
    for k, v in loop.last_eval.items():
      prefix, sep, rest = k.rpartition('/')
      if sep:
        extra.setdefault(f'{prefix}_eval', {})[rest] = v
      else:
        own[k] = v
    summary['eval'] = own
    summary.update(extra)
  if primary:
    tmp = os.path.join(workdir, SUMMARY_FILE + '.tmp')
    with open(tmp, 'w') as f:
      json.dump(summary, f, indent=2)
    os.replace(tmp, os.path.join(workdir, SUMMARY_FILE))
  if signum:
    raise errors.Preempted(
        signum, done, f'{errors.signal_name(signum)}: saved checkpoint '
        f'{done} in {ckpt_dir} and stopped; run the same command to resume.')
  if primary:
    _print_summary(summary)
  return summary


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


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        step: int | None = None) -> dict[str, Any]:
  """Evaluates a checkpoint of ``workdir`` on ``config.dataset.eval_split``.

  Args:
    config: the run's config (see :func:`experiments.experiment.
      load_run_config`); data paths, the eval split and batch size may
      differ from training.
    workdir: the run directory.
    step: checkpoint step (default: the newest).

  Returns:
    ``{'step', 'loss', 'top1', 'top5', 'count'}``.

  Raises:
    experiments.checkpointing.CheckpointCorruptError: checkpoint ``step``
      fails its checksums (with ``step=None``: every checkpoint does; a
      corrupt newest one falls back to the newest intact one).
  """
  exp, host_state, step = restore_checkpoint(config, workdir, step)
  _, result = exp.evaluate_state(exp.runner.put_state(host_state))
  result['step'] = step
  return result


def restore_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                       step: int | None = None) -> tuple[Any, Any, int]:
  """``(experiment, host state, step)`` of a checkpoint of ``workdir``.

  The checkpoint's checksums are verified first, so a corrupt one fails
  before anything is compiled; with ``step=None`` the newest intact one is
  taken. The checkpointer is closed on every path (Orbax's threads
  otherwise print errors at exit after a user error).

  Raises:
    experiments.checkpointing.NoRunError: no checkpoint.
    experiments.checkpointing.CheckpointCorruptError: checkpoint ``step``
      fails its checksums.
  """
  validate_config(config)
  with checkpointing.Checkpointer(workdir, primary=False) as ckpt:
    if step is None:
      step = ckpt.newest_verified_step()
      if step is None:
        raise checkpointing.NoRunError(f'no checkpoint in {ckpt.directory}.')
    else:
      ckpt.verify(step)
    exp = Experiment.from_config(config)
    host_state, _ = ckpt.restore(step, exp.init_host_state())
  return exp, host_state, int(step)
