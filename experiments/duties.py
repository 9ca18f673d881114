"""The periodic duties of the train loop, each a small object.

The loop (:func:`experiments.train.train_and_evaluate`) runs a step, then
calls every duty's :meth:`Duty.after_step` in order; after the last step of
a run that was not stopped by a signal it calls :meth:`Duty.finish`, and
:meth:`Duty.close` always. A duty reads and writes the shared
:class:`LoopState` (the train state, the step count, the stop signal, the
last evaluation). Adding a duty (an extra metric, a sample dump) touches
neither the loop nor the other duties.

The duties of a training run, in the order they run after each step:

* :class:`MetricsWindow`: sums the step metrics; every
  ``config.log_every_steps`` writes the means (JSON lines + TensorBoard)
  with the learning rate and throughput, and stops a run whose mean
  training loss is not finite.
* :class:`Evaluation`: every ``config.eval_every_epochs`` epochs (and at the
  end) evaluates the state (BN recalibration first when configured).
* :class:`ProgressBar`: a tqdm bar on process 0.
* :class:`Preemption`: asks :class:`experiments.preemption.StopRequest`
  whether a signal asks the run to stop at this step.
* :class:`Checkpointing`: every ``config.checkpoint_every_steps`` (default:
  every epoch), when stopping, and at the end, saves the state with the
  metric window (a resumed run logs exactly what an uninterrupted one does);
  refuses to save non-finite parameters.

Examples:
  >>> loop = LoopState(state=None, step=0, start_step=0, stop_step=3)
  >>> class Count(Duty):
  ...   calls = 0
  ...   def after_step(self, loop, metrics):
  ...     self.calls += 1
  >>> d = Count()
  >>> for loop.step in (1, 2, 3):
  ...   d.after_step(loop, {})
  >>> d.calls
  3
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from experiments import checkpointing
from experiments import errors

PyTree = Any


@dataclasses.dataclass
class LoopState:
  """What the loop and its duties share.

  Attributes:
    state: the train state (on the devices).
    step: steps done.
    start_step: the step this segment started from.
    stop_step: the step the run trains to.
    signum: a signal that stops the run at this step (0: none).
    last_eval: the newest evaluation's metrics.
    last_eval_step: the step of :attr:`last_eval`.
  """
  state: Any
  step: int
  start_step: int
  stop_step: int
  signum: int = 0
  last_eval: dict[str, float] | None = None
  last_eval_step: int | None = None

  @property
  def at_end(self) -> bool:
    return self.step == self.stop_step


class Duty:
  """A periodic duty of the loop (subclass and override what you need)."""

  def after_step(self, loop: LoopState, metrics: PyTree) -> None:
    """Runs after every step; ``metrics`` are the step's metric sums."""

  def finish(self, loop: LoopState) -> None:
    """Runs once after the last step (not when a signal stopped the run)."""

  def close(self) -> None:
    """Runs always, last (release files and bars)."""


def diverged_error(what: str, step: int, ckpt) -> errors.TrainingDivergedError:
  """The error a non-finite loss or parameter stops the run with."""
  last = ckpt.latest_step()
  where = (f'the last good checkpoint is step {last} in {ckpt.directory}'
           if last is not None else 'no checkpoint was written')
  return errors.TrainingDivergedError(
      f'training diverged: {what} at step {step}; stopped without saving '
      f'({where}). Lower --config.optimizer.learning_rate or check the '
      'data.')


def all_finite(tree) -> tuple[bool, str]:
  """Whether every floating leaf is finite, and the first bad leaf's path.

  Examples:
    >>> all_finite({'a': np.ones(2), 'b': np.array([np.nan])})
    (False, "['b']")
  """
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    a = np.asarray(leaf)
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
      return False, jax.tree_util.keystr(path)
  return True, ''


class MetricsWindow(Duty):
  """Sums step metrics and writes their means every ``log_every`` steps.

  The window (sums since the last log line) is saved with every checkpoint
  (:meth:`snapshot`) and restored on resume, so a resumed run writes the
  same records as an uninterrupted one. The first window holds compilation
  and is left out of the throughput unless it is the only one.

  Args:
    runner: gives host copies of the metric sums.
    writer: the :class:`experiments.metrics.MetricWriter`.
    schedule: the learning-rate schedule (logged).
    batch_size: the global batch size.
    steps_per_epoch: steps per epoch.
    log_every: log every this many steps (and at the last step).
    ckpt: the checkpointer (named in the divergence error).
    saved_window: the window restored from a checkpoint (or ``None``).
    saved_window_steps: its step count.
    start_step: the step this segment starts from.
  """

  def __init__(self, runner, writer, schedule: Callable, batch_size: int,
               steps_per_epoch: int, log_every: int, ckpt,
               saved_window: dict | None = None, saved_window_steps: int = 0,
               start_step: int = 0):
    self.runner, self.writer, self.schedule = runner, writer, schedule
    self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
    self.log_every, self.ckpt = log_every, ckpt
    self.window = None
    self.steps = 0
    if saved_window is not None:
      self.window = {k: np.float32(v) for k, v in saved_window.items()}
      self.steps = int(saved_window_steps)
    self.first = start_step - self.steps + 1
    self.clock = time.time()
    self.train_images, self.train_seconds = 0, 0.0
    self._first_window = True
    #: The scalars of the newest log line (``None`` before the first).
    self.logged: dict[str, float] | None = None
    self.logged_step: int | None = None

  def restart_clock(self) -> None:
    """Leaves the time since the last call out of the throughput."""
    self.clock = time.time()

  @property
  def empty(self) -> bool:
    return self.window is None

  def after_step(self, loop: LoopState, metrics: PyTree) -> None:
    self.window = (metrics if self.window is None else
                   jax.tree.map(jnp.add, self.window, metrics))
    self.steps += 1
    done = loop.step
    if done % self.log_every == 0 or loop.at_end:
      self._write(done, loop.at_end)

  def _write(self, done: int, at_end: bool) -> None:
    host = self.runner.get_metrics(self.window)
    elapsed = time.time() - self.clock
    ips = self.steps * self.batch_size / max(elapsed, 1e-9)
    if not self._first_window or at_end:
      self.train_images += self.steps * self.batch_size
      self.train_seconds += elapsed
    self._first_window = False
    count = float(host['count'])
    scalars = {'train/loss': float(host['loss']) / count,
               'train/top1': float(host['top1']) / count,
               'train/top5': float(host['top5']) / count,
               'train/learning_rate': float(self.schedule(done - 1)),
               'train/images_per_second': ips,
               'train/epoch': done / self.steps_per_epoch}
    for key in sorted(host):
      # The objective's extra terms ('loss/<name>') and a method's own
      # figures (e.g. 'teacher/top1'), all sums over the examples.
      if key not in ('loss', 'top1', 'top5', 'count'):
        scalars[f'train/{key}'] = float(host[key]) / count
    self.writer.write(done, scalars)
    if not np.isfinite(scalars['train/loss']):
      raise diverged_error(f'the mean training loss of steps {self.first}-'
                           f'{done} is {scalars["train/loss"]}', done,
                           self.ckpt)
    self.logged, self.logged_step = scalars, done
    self.window, self.steps, self.first = None, 0, done + 1
    self.restart_clock()

  def snapshot(self, step: int) -> tuple[dict | None, int]:
    """``(host window, its steps)`` to save with a checkpoint at ``step``.

    Raises:
      experiments.errors.TrainingDivergedError: the window's loss is not
        finite.
    """
    if self.window is None:
      return None, self.steps
    host = {k: float(np.float32(v)) for k, v in
            self.runner.get_metrics(self.window).items()}
    if not np.isfinite(host['loss']):
      raise diverged_error(f'the training loss is {host["loss"]}', step,
                           self.ckpt)
    return host, self.steps


class Evaluation(Duty):
  """Evaluates every ``every_epochs`` epochs and at the end of the run.

  Args:
    evaluate_state: ``state -> (state, metrics)`` (BN recalibration may
      replace the running statistics in the state).
    writer: the metric writer (``eval/*`` records).
    steps_per_epoch: steps per epoch.
    every_epochs: evaluate every this many epochs.
    window: the metrics window, whose clock restarts after an evaluation.
  """

  def __init__(self, evaluate_state: Callable, writer, steps_per_epoch: int,
               every_epochs: int, window: MetricsWindow | None = None):
    self.evaluate_state, self.writer = evaluate_state, writer
    self.steps_per_epoch, self.every_epochs = steps_per_epoch, every_epochs
    self.window = window

  def run(self, loop: LoopState, step: int) -> None:
    loop.state, result = self.evaluate_state(loop.state)
    if not self.writer.has_record(step, 'eval/'):
      self.writer.write(step, {f'eval/{k}': v for k, v in result.items()
                               if k != 'count'})
    logging.info('step %d eval: %s', step, result)
    loop.last_eval, loop.last_eval_step = result, step

  def after_step(self, loop: LoopState, metrics: PyTree) -> None:
    done = loop.step
    if done % self.steps_per_epoch == 0 and (
        (done // self.steps_per_epoch) % self.every_epochs == 0):
      self.run(loop, done)
      if self.window is not None:
        self.window.restart_clock()

  def finish(self, loop: LoopState) -> None:
    if loop.last_eval_step != loop.stop_step:
      self.run(loop, loop.stop_step)


class ProgressBar(Duty):
  """A tqdm progress bar with the logged loss and each evaluation.

  Args:
    window: the metrics window whose newest line the bar shows.
    start_step: the step the segment starts from.
    stop_step: the step the run trains to.
    steps_per_epoch: steps per epoch.
  """

  def __init__(self, window: MetricsWindow, start_step: int, stop_step: int,
               steps_per_epoch: int):
    self.window, self.steps_per_epoch = window, steps_per_epoch
    self.bar = tqdm.tqdm(total=stop_step, initial=start_step, unit='step',
                         dynamic_ncols=True, desc='train')

  def after_step(self, loop: LoopState, metrics: PyTree) -> None:
    self.bar.update(1)
    s = self.window.logged
    if s is not None and self.window.logged_step == loop.step:
      self.bar.set_postfix(loss=f"{s['train/loss']:.4f}",
                           top1=f"{s['train/top1']:.3f}",
                           ips=f"{s['train/images_per_second']:.0f}")
    if loop.last_eval_step == loop.step and loop.last_eval is not None:
      self.bar.write(f'epoch {loop.step // self.steps_per_epoch}: test top-1 '
                     f'{100 * loop.last_eval["top1"]:.2f}%, loss '
                     f'{loop.last_eval["loss"]:.4f}')

  def finish(self, loop: LoopState) -> None:
    self.close()

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None


class Preemption(Duty):
  """Sets ``loop.signum`` when a signal asks the run to stop at this step.

  Args:
    stop: the :class:`experiments.preemption.StopRequest` (all processes
      agree on the step).
  """

  def __init__(self, stop, start_step: int = 0):
    self.stop = stop
    stop.begin(start_step)

  def after_step(self, loop: LoopState, metrics: PyTree) -> None:
    loop.signum = 0 if loop.at_end else self.stop.poll(loop.step)


class Checkpointing(Duty):
  """Saves the state every ``every`` steps, on a stop signal, and at the end.

  Args:
    ckpt: the :class:`experiments.checkpointing.Checkpointer`.
    runner: gives host copies of the state.
    every: save every this many steps.
    data_state: what fixes the data stream (saved with each checkpoint).
    steps_per_epoch: steps per epoch.
    window: the metrics window saved with the state.
  """

  def __init__(self, ckpt: checkpointing.Checkpointer, runner, every: int,
               data_state: dict[str, Any], steps_per_epoch: int,
               window: MetricsWindow):
    self.ckpt, self.runner, self.every = ckpt, runner, every
    self.data_state, self.steps_per_epoch = data_state, steps_per_epoch
    self.window = window

  def save(self, state, step: int, final: bool = False,
           force: bool = False) -> None:
    """Saves ``state`` at ``step`` (raises, saving nothing, if not finite)."""
    host = self.runner.get_state(state)
    ok, leaf = all_finite(host.params)
    if not ok:
      raise diverged_error(f'parameter {leaf} is not finite', step,
                           self.ckpt)
    window, window_steps = (None, 0) if final else self.window.snapshot(step)
    self.ckpt.save(step, host, dict(self.data_state, step=step,
                                    epoch=step / self.steps_per_epoch,
                                    window=window,
                                    window_steps=window_steps), force=force)

  def after_step(self, loop: LoopState, metrics: PyTree) -> None:
    done = loop.step
    if not loop.at_end and (done % self.every == 0 or loop.signum):
      self.save(loop.state, done, force=bool(loop.signum))
      if self.window.empty:
        self.window.restart_clock()
    self.ckpt.poll()

  def finish(self, loop: LoopState) -> None:
    if self.ckpt.latest_step() != loop.stop_step:
      self.save(loop.state, loop.stop_step, final=True, force=True)


def run_duties(loop: LoopState, duties, metrics: PyTree) -> None:
  """Calls every duty's :meth:`Duty.after_step` in order."""
  for duty in duties:
    duty.after_step(loop, metrics)
