"""Orbax checkpoints of a run, and the config guard of its workdir.

A workdir holds ``config.json`` (the run's config, written once when the run
starts), ``checkpoints/<step>/`` (Orbax: the train state as numpy arrays plus
a JSON record of the data position), ``metrics.jsonl``, ``tensorboard/`` and
``summary.json``.

Restarting with the same ``--workdir`` resumes from the newest checkpoint.
The state (step, parameters, BatchNorm statistics, optimizer state and the
RNG key) is restored exactly; the data order and augmentation are functions
of ``(seed, step)`` (:mod:`experiments.data`), so the resumed run continues
the same stream and ends bit-identical to an uninterrupted one.

Before anything is written, the new config is compared with the stored one:
a different model (``model.*``, ``dataset.name``/``num_classes``/
``image_size``) or any other training-relevant difference is an error naming
the keys, and nothing in the workdir is touched. Only the keys in
:data:`RUNTIME_KEYS` (logging, checkpoint cadence, data paths, parallelism,
the step limit) may change between a run and its resumption.

Integrity: once Orbax has finished writing a checkpoint (asynchronous saves
included), the sha256 and size of every file in its step directory are
recorded in ``checkpoint_checksums/<step>.json``. :meth:`Checkpointer.restore`
verifies them first: a changed, truncated, missing or extra file raises
:class:`CheckpointCorruptError` naming the step and the file, and
:meth:`Checkpointer.restore_newest_intact` falls back to the newest intact
checkpoint. A checkpoint without a checksum file (written before checksums
existed, or killed between Orbax's finish and the checksum) is restored with
a warning; if Orbax cannot read it, that is a :class:`CheckpointCorruptError`
too, in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from experiments import errors
from experiments import integrity

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
CHECKSUM_DIR = 'checkpoint_checksums'
#: Where corrupt checkpoints are moved when a run falls back past them.
QUARANTINE_DIR = 'corrupt_checkpoints'

#: Config keys that may differ between a run and its resumption.
RUNTIME_KEYS = frozenset({
    'log_every_steps', 'checkpoint_every_steps', 'max_to_keep',
    'progress_bar', 'parallelism', 'mesh_shape', 'mesh_axes', 'remat',
    'remat_blocks',
    'eval_batch_size', 'eval_every_epochs',
    'num_train_steps', 'distributed', 'async_checkpointing', 'tensorboard',
    'dataset.data_dir', 'dataset.tfds_data_dir', 'dataset.num_workers',
    'dataset.prefetch',
})
#: Keys that define the model whose parameters a checkpoint holds.
MODEL_KEYS_PREFIXES = ('model.', 'dataset.name', 'dataset.num_classes',
                       'dataset.image_size')


#: Keys added after workdirs already existed: absent from an older stored
#: config.json, they are not compared.
ADDED_KEYS = frozenset({'dataset.mean', 'dataset.std', 'method',
                        'loss_terms', 'optimizer.lr_scales', 'remat_blocks'})


class WorkdirMismatchError(errors.UserError, ValueError):
  """The workdir holds a run of another config."""


class NoRunError(errors.UserError, FileNotFoundError):
  """The workdir holds no run (no config.json or no checkpoint)."""


class CheckpointCorruptError(errors.UserError, ValueError):
  """A checkpoint's files differ from their checksums, or do not load."""


def flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  """Flattens nested dicts to ``{'a.b': value}``.

  Examples:
    >>> flatten({'a': {'b': 1}, 'c': [1, 2]})
    {'a.b': 1, 'c': [1, 2]}
  """
  out = {}
  for k, v in tree.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(flatten(v, key + '.'))
    else:
      out[key] = v
  return out


def config_to_dict(config) -> dict[str, Any]:
  """A JSON round-trip of an ml_collections config (tuples become lists)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def compare_configs(stored: dict[str, Any], new: dict[str, Any]) -> None:
  """Raises :class:`WorkdirMismatchError` unless the configs agree.

  Examples:
    >>> compare_configs({'model': {'kind': 'adder'}, 'log_every_steps': 1},
    ...                 {'model': {'kind': 'adder'}, 'log_every_steps': 5})
    >>> compare_configs({'model': {'kind': 'adder'}},
    ...                 {'model': {'kind': 'cnn'}})
    Traceback (most recent call last):
    ...
    experiments.checkpointing.WorkdirMismatchError: the workdir holds a run of another model: model.kind: stored 'adder', now 'cnn'. Use a new --workdir (nothing was overwritten).
  """
  a, b = flatten(stored), flatten(new)
  diffs = sorted(k for k in set(a) | set(b)
                 if k not in RUNTIME_KEYS and
                 not (k in ADDED_KEYS and k not in a) and
                 a.get(k, '<absent>') !=
                 b.get(k, '<absent>'))
  if not diffs:
    return
  model_diffs = [k for k in diffs if k.startswith(MODEL_KEYS_PREFIXES)]
  what = 'another model' if model_diffs else 'another config'
  shown = model_diffs or diffs
  details = '; '.join(f'{k}: stored {a.get(k, "<absent>")!r}, now '
                      f'{b.get(k, "<absent>")!r}' for k in shown[:8])
  more = f' (and {len(shown) - 8} more)' if len(shown) > 8 else ''
  raise WorkdirMismatchError(
      f'the workdir holds a run of {what}: {details}{more}. Use a new '
      '--workdir (nothing was overwritten).')


class Checkpointer:
  """Orbax ``CheckpointManager`` for a workdir, plus its stored config.

  Args:
    workdir: the run directory.
    max_to_keep: checkpoints kept (older ones are deleted).
    async_save: write checkpoints in the background.
    primary: whether this process writes ``config.json`` and the checksum
      files.
  """

  def __init__(self, workdir: str, max_to_keep: int = 3,
               async_save: bool = True, primary: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.primary = primary
    self.config_path = os.path.join(self.workdir, CONFIG_FILE)
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True,
        enable_async_checkpointing=async_save)
    self._manager = None
    self._pending: list[int] = []  # saved, checksum not yet written

  @property
  def directory(self) -> str:
    return os.path.join(self.workdir, CHECKPOINT_DIR)

  @property
  def manager(self) -> ocp.CheckpointManager:
    if self._manager is None:
      self._manager = ocp.CheckpointManager(self.directory,
                                            options=self._options)
    return self._manager

  def step_directory(self, step: int) -> str:
    return os.path.join(self.directory, str(int(step)))

  def checksum_path(self, step: int) -> str:
    return os.path.join(self.workdir, CHECKSUM_DIR, f'{int(step)}.json')

  def stored_config(self) -> dict[str, Any] | None:
    """The stored ``config.json`` (None if absent)."""
    if not os.path.exists(self.config_path):
      return None
    try:
      with open(self.config_path) as f:
        return json.load(f)
    except ValueError as e:
      raise WorkdirMismatchError(
          f'{self.config_path} is not valid JSON ({e}); cannot tell which '
          'run this workdir holds. Use a new --workdir.') from e

  def has_checkpoint(self) -> bool:
    return (os.path.isdir(self.directory) and
            self.manager.latest_step() is not None)

  def check_config(self, config) -> None:
    """Raises unless the workdir is empty of runs or holds this config."""
    stored = self.stored_config()
    if stored is None:
      if self.has_checkpoint():
        raise WorkdirMismatchError(
            f'{self.workdir} holds checkpoints but no {CONFIG_FILE}; cannot '
            'tell which model they are. Use a new --workdir.')
      return
    compare_configs(stored, config_to_dict(config))

  def write_config(self, config) -> None:
    if not self.primary or os.path.exists(self.config_path):
      return
    os.makedirs(self.workdir, exist_ok=True)
    tmp = self.config_path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(config_to_dict(config), f, indent=2, sort_keys=True)
    os.replace(tmp, self.config_path)

  def latest_step(self) -> int | None:
    if not os.path.isdir(self.directory):
      return None
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    """The finished checkpoints' steps, newest first."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(self.manager.all_steps(), reverse=True)

  # --- saving ----------------------------------------------------------------

  def save(self, step: int, host_state: Any, data_state: dict[str, Any],
           force: bool = False) -> None:
    """Saves ``host_state`` (numpy pytree) and ``data_state`` at ``step``.

    With asynchronous saving this returns while Orbax writes; the checksum
    file is written once Orbax has finished (:meth:`poll`, the next save,
    :meth:`wait` or :meth:`close`).
    """
    self.finish_pending(wait=True)
    saved = self.manager.save(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(host_state),
            data=ocp.args.JsonSave(data_state)), force=force)
    if saved:
      self._pending.append(int(step))
    if not self._options.enable_async_checkpointing:
      self.finish_pending(wait=True)

  def poll(self) -> None:
    """Writes the checksums of saves Orbax has finished (cheap; no wait).

    Single-process only: with several processes, waiting on Orbax is kept
    to the points every process reaches together (the next save, close).
    """
    if not self._pending:
      return
    if jax.process_count() == 1 and not self.manager.is_saving_in_progress():
      self.finish_pending(wait=True)

  def finish_pending(self, wait: bool = True) -> None:
    """Waits for Orbax, then writes the pending checksum files."""
    if not self._pending:
      return
    if wait:
      self.manager.wait_until_finished()
    pending, self._pending = self._pending, []
    if not self.primary:
      return
    present = set(self.manager.all_steps())
    for step in pending:
      if step in present:
        integrity.write_manifest(self.step_directory(step),
                                 self.checksum_path(step), step=step)
    self._prune_checksums(present)

  def _prune_checksums(self, present) -> None:
    """Deletes checksum files of checkpoints Orbax has removed."""
    directory = os.path.join(self.workdir, CHECKSUM_DIR)
    if not os.path.isdir(directory):
      return
    for name in os.listdir(directory):
      stem = name[:-len('.json')] if name.endswith('.json') else None
      if stem is not None and stem.isdigit() and int(stem) not in present:
        os.remove(os.path.join(directory, name))

  # --- restoring -------------------------------------------------------------

  def verify(self, step: int) -> bool:
    """Checks checkpoint ``step`` against its checksums.

    Returns:
      True if verified; False if it has no checksum file (a warning is
      logged: it is restored unverified).

    Raises:
      CheckpointCorruptError: a file differs, is missing or is extra.
    """
    if not os.path.isdir(self.step_directory(step)):
      raise CheckpointCorruptError(
          f'checkpoint {step} not found in {self.directory} (steps there: '
          f'{self.all_steps() or "none"}).')
    manifest = self.checksum_path(step)
    if not os.path.exists(manifest):
      logging.warning('Checkpoint %d in %s has no checksum file (%s); '
                      'restoring it unverified.', step, self.directory,
                      manifest)
      return False
    try:
      integrity.verify_manifest(self.step_directory(step), manifest,
                                f'checkpoint {step}')
    except integrity.ChecksumMismatchError as e:
      raise CheckpointCorruptError(str(e)) from e
    return True

  def _restore(self, step: int, args) -> Any:
    self.verify(step)
    try:
      return self.manager.restore(step, args=args)
    except Exception as e:  # pylint: disable=broad-except
      first = ' '.join(str(e).split())[:300]
      raise CheckpointCorruptError(
          f'checkpoint {step} in {self.directory} cannot be read '
          f'({type(e).__name__}: {first}).') from e

  def restore(self, step: int, host_target: Any) -> tuple[Any, dict]:
    """Restores the numpy state shaped like ``host_target`` and the data.

    Raises:
      CheckpointCorruptError: the checkpoint fails its checksums or does
        not load.
    """
    restored = self._restore(step, ocp.args.Composite(
        state=ocp.args.StandardRestore(host_target),
        data=ocp.args.JsonRestore()))
    state = restored['state']
    state = _as_numpy_like(host_target, state)
    return state, dict(restored['data'])

  def restore_newest_intact(self, host_target: Any
                            ) -> tuple[int | None, Any, dict, list]:
    """Restores the newest checkpoint that passes its checks.

    Returns:
      ``(step, state, data_state, corrupt)``: ``step`` is None (and
      ``state`` is ``host_target``) when there is no checkpoint; ``corrupt``
      lists ``(step, message)`` of the newer checkpoints skipped.

    Raises:
      CheckpointCorruptError: every checkpoint is corrupt.
    """
    corrupt = []
    for step in self.all_steps():
      try:
        state, data = self.restore(step, host_target)
      except CheckpointCorruptError as e:
        logging.warning('%s Falling back to an older checkpoint.', e)
        corrupt.append((step, str(e)))
        continue
      return step, state, data, corrupt
    if corrupt:
      raise CheckpointCorruptError(
          f'no intact checkpoint in {self.directory}: {corrupt[0][1]} '
          f'({len(corrupt)} checkpoint(s) corrupt). Use a new --workdir or '
          'move the checkpoints away.')
    return None, host_target, {}, []

  def newest_verified_step(self) -> int | None:
    """The newest checkpoint that passes its checksums (no restore).

    Corrupt newer ones are skipped with a warning; None if there is no
    checkpoint.

    Raises:
      CheckpointCorruptError: every checkpoint is corrupt.
    """
    corrupt = []
    for step in self.all_steps():
      try:
        self.verify(step)
      except CheckpointCorruptError as e:
        logging.warning('%s Falling back to an older checkpoint.', e)
        corrupt.append(str(e))
        continue
      return step
    if corrupt:
      raise CheckpointCorruptError(
          f'no intact checkpoint in {self.directory}: {corrupt[0]} '
          f'({len(corrupt)} checkpoint(s) corrupt). Use a new --workdir or '
          'move the checkpoints away.')
    return None

  def quarantine(self, steps) -> list[str]:
    """Moves checkpoints out of Orbax's way into ``corrupt_checkpoints/``.

    Used when a run falls back past corrupt checkpoints: it would write the
    same steps again. Returns the new paths.
    """
    if not steps:
      return []
    moved = []
    stamp = time.strftime('%Y%m%d-%H%M%S')
    for step in (steps if self.primary else ()):
      src = self.step_directory(step)
      if not os.path.isdir(src):
        continue
      dst = os.path.join(self.workdir, QUARANTINE_DIR, f'{step}-{stamp}')
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.move(src, dst)
      manifest = self.checksum_path(step)
      if os.path.exists(manifest):
        shutil.move(manifest, dst + '.sha256.json')
      moved.append(dst)
    if jax.process_count() > 1:  # every process sees the move before going on
      multihost_utils.sync_global_devices('adderjax_quarantine')
    if self._manager is not None:
      self._manager.reload()
    return moved

  def restore_saved(self, step: int | None = None) -> tuple[Any, dict]:
    """Restores a checkpoint as saved (nested dicts of arrays), no target.

    Args:
      step: the checkpoint step (default: the newest).

    Returns:
      ``(state, data_state)``; ``state`` has keys ``step``, ``params``,
      ``batch_stats``, ``opt_state``, ``rng``.

    Raises:
      FileNotFoundError: no checkpoint.
      CheckpointCorruptError: the checkpoint fails its checksums.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise NoRunError(f'no checkpoint in {self.directory}.')
    restored = self._restore(step, ocp.args.Composite(
        state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
    return restored['state'], dict(restored['data'])

  def wait(self) -> None:
    if self._manager is not None:
      self.finish_pending(wait=True)
      self._manager.wait_until_finished()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Finishes pending saves and closes Orbax's manager (idempotent)."""
    if self._manager is not None:
      self.finish_pending(wait=True)
      self._manager.wait_until_finished()
      self._manager.close()
      self._manager = None


def _as_numpy_like(target: Any, restored: Any) -> Any:
  return jax.tree.map(lambda t, r: np.asarray(r, dtype=np.asarray(t).dtype),
                      target, restored)
