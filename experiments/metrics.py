"""Metric writers: JSON lines and TensorBoard event files (no TensorFlow).

TensorBoard files are written with ``tensorboardX`` when it is installed (a
pure-Python writer); without it only the JSON lines are written and a note is
logged. Only process 0 writes.

Examples:
  >>> import json, os, tempfile
  >>> d = tempfile.mkdtemp()
  >>> w = MetricWriter(d, tensorboard=False)
  >>> w.write(10, {'train/loss': 0.5})
  >>> w.close()
  >>> [json.loads(l) for l in open(os.path.join(d, 'metrics.jsonl'))]
  [{'step': 10, 'train/loss': 0.5}]
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

from absl import logging

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'


def _plain(value: Any) -> Any:
  try:
    v = float(value)
  except (TypeError, ValueError):
    return value
  if isinstance(value, (int,)) and not isinstance(value, bool):
    return int(value)
  return v if math.isfinite(v) else str(v)


def truncate_jsonl(path: str, max_step: int) -> None:
  """Drops the records of steps after ``max_step`` (work lost by a crash).

  Examples:
    >>> import os, tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), 'm.jsonl')
    >>> _ = open(p, 'w').write('{"step": 1}\\n{"step": 5}\\n{"step": 9')
    >>> truncate_jsonl(p, 5)
    >>> open(p).read()
    '{"step": 1}\\n{"step": 5}\\n'
  """
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut by a kill
      if record.get('step', 0) <= max_step:
        kept.append(json.dumps(record))
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(''.join(k + '\n' for k in kept))
  os.replace(tmp, path)


class MetricWriter:
  """Appends scalars to ``workdir/metrics.jsonl`` and TensorBoard events.

  Args:
    workdir: run directory.
    enabled: write anything at all (False on processes other than 0).
    tensorboard: also write TensorBoard event files.
    resume_step: on a resumed run, records after this step (from work lost
      since the last checkpoint) are dropped from the JSON lines, and
      TensorBoard is told to purge them.
  """

  def __init__(self, workdir: str, enabled: bool = True,
               tensorboard: bool = True, resume_step: int | None = None):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if resume_step is not None:
      truncate_jsonl(self.path, resume_step)
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      except ImportError:
        logging.warning('tensorboardX is not installed: metrics go to %s '
                        'only (pip install tensorboardX).', self.path)
      else:
        kwargs = {}
        if resume_step is not None:
          kwargs['purge_step'] = resume_step + 1
        self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR),
                                 **kwargs)

  def has_record(self, step: int, prefix: str) -> bool:
    """Whether ``metrics.jsonl`` has a record of ``step`` with a key
    starting with ``prefix`` (so a re-run does not write it twice)."""
    if not self.enabled or not os.path.exists(self.path):
      return False
    with open(self.path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue
        if record.get('step') == step and any(
            k.startswith(prefix) for k in record):
          return True
    return False

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step)}
    record.update({k: _plain(v) for k, v in scalars.items()})
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for k, v in scalars.items():
        try:
          self._tb.add_scalar(k, float(v), int(step))
        except (TypeError, ValueError):
          pass
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
