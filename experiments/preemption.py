"""SIGTERM / SIGINT as a request to save and stop at the next step boundary.

TPU VMs and batch schedulers preempt with SIGTERM; a user stops a run with
Ctrl-C (SIGINT). While training, :class:`StopRequest` replaces both handlers
by one that only records the signal; the loop checks :meth:`StopRequest.poll`
after every step, saves a checkpoint and stops. A second signal while the
first is being handled restores the default action and re-sends itself (an
immediate stop, as before).

With several processes (``jax.process_count() > 1``) a signal may reach the
processes at different steps; :meth:`StopRequest.poll` then combines the
flags of all processes (a tiny ``process_allgather`` each step), so every
process stops at the same step and writes the same checkpoint.

Examples:
  >>> import os, signal
  >>> with StopRequest() as stop:
  ...   os.kill(os.getpid(), signal.SIGTERM)
  ...   stop.poll() == signal.SIGTERM
  True
"""

from __future__ import annotations

import os
import signal
import threading

from absl import logging

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
  """Records SIGTERM/SIGINT while active (a context manager).

  Args:
    signals: the signals to catch.
    sync_processes: combine the flag over all JAX processes in
      :meth:`poll` (default: when ``jax.process_count() > 1``).
  """

  def __init__(self, signals=SIGNALS, sync_processes: bool | None = None):
    self.signals = tuple(signals)
    self.signum = 0
    self._previous = {}
    self._sync = sync_processes

  def _handler(self, signum, frame):
    del frame
    if self.signum:
      # Second signal: give up on the clean stop.
      logging.warning('%s again: stopping now, without saving.',
                      signal.Signals(signum).name)
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self.signum = signum
    logging.warning('%s received: saving a checkpoint at the next step '
                    'boundary, then stopping (send it again to stop at once).',
                    signal.Signals(signum).name)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self.signals:
        self._previous[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def poll(self) -> int:
    """The signal to stop for (0: go on), agreed by all processes."""
    sync = self._sync
    if sync is None:
      import jax  # pylint: disable=g-import-not-at-top
      sync = jax.process_count() > 1
      self._sync = sync
    if not sync:
      return self.signum
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.int32(self.signum))
    return int(np.max(flags))
