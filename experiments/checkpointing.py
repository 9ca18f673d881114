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
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'

#: Config keys that may differ between a run and its resumption.
RUNTIME_KEYS = frozenset({
    'log_every_steps', 'checkpoint_every_steps', 'max_to_keep',
    'progress_bar', 'parallelism', 'mesh_shape', 'mesh_axes',
    'eval_batch_size', 'eval_every_epochs',
    'num_train_steps', 'distributed', 'async_checkpointing', 'tensorboard',
    'dataset.data_dir', 'dataset.tfds_data_dir', 'dataset.num_workers',
    'dataset.prefetch',
})
#: Keys that define the model whose parameters a checkpoint holds.
MODEL_KEYS_PREFIXES = ('model.', 'dataset.name', 'dataset.num_classes',
                       'dataset.image_size')


class WorkdirMismatchError(ValueError):
  """The workdir holds a run of another config."""


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
                 if k not in RUNTIME_KEYS and a.get(k, '<absent>') !=
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
    primary: whether this process writes ``config.json``.
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

  @property
  def directory(self) -> str:
    return os.path.join(self.workdir, CHECKPOINT_DIR)

  @property
  def manager(self) -> ocp.CheckpointManager:
    if self._manager is None:
      self._manager = ocp.CheckpointManager(self.directory,
                                            options=self._options)
    return self._manager

  def stored_config(self) -> dict[str, Any] | None:
    if not os.path.exists(self.config_path):
      return None
    with open(self.config_path) as f:
      return json.load(f)

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

  def save(self, step: int, host_state: Any, data_state: dict[str, Any],
           force: bool = False) -> None:
    """Saves ``host_state`` (numpy pytree) and ``data_state`` at ``step``."""
    self.manager.save(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(host_state),
            data=ocp.args.JsonSave(data_state)), force=force)

  def restore(self, step: int, host_target: Any) -> tuple[Any, dict]:
    """Restores the numpy state shaped like ``host_target`` and the data."""
    restored = self.manager.restore(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(host_target),
            data=ocp.args.JsonRestore()))
    state = restored['state']
    state = _as_numpy_like(host_target, state)
    return state, dict(restored['data'])

  def restore_saved(self, step: int | None = None) -> tuple[Any, dict]:
    """Restores a checkpoint as saved (nested dicts of arrays), no target.

    Args:
      step: the checkpoint step (default: the newest).

    Returns:
      ``(state, data_state)``; ``state`` has keys ``step``, ``params``,
      ``batch_stats``, ``opt_state``, ``rng``.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}.')
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                      data=ocp.args.JsonRestore()))
    return restored['state'], dict(restored['data'])

  def wait(self) -> None:
    if self._manager is not None:
      self._manager.wait_until_finished()

  def close(self) -> None:
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()
      self._manager = None


def _as_numpy_like(target: Any, restored: Any) -> Any:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda t, r: np.asarray(r, dtype=np.asarray(t).dtype),
                      target, restored)
