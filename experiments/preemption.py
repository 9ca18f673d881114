"""SIGTERM / SIGINT as a request to save and stop at a step boundary.

TPU VMs and batch schedulers preempt with SIGTERM; a user stops a run with
Ctrl-C (SIGINT). While training, :class:`StopRequest` replaces both handlers
by one that only records the signal; the loop calls
:meth:`StopRequest.poll` after every step, and when it returns a signal
number the loop saves a checkpoint and stops. A second signal while the
first is being handled restores the default action and re-sends itself (an
immediate stop, as before).

With several processes (``jax.process_count() > 1``) a signal may reach the
processes at different steps (or only one of them), yet every process must
stop at the same step and write the same checkpoint. ``poll(step)`` gets
them to agree without a host synchronisation per step (which would stop
JAX's asynchronous dispatch from running ahead of the devices):

* SIGTERM goes through JAX's preemption service when it is on (it is by
  default: ``jax.distributed.initialize`` starts a preemption sync manager
  on the coordination service unless ``jax_enable_preemption_service`` is
  off). The process that got the signal posts a preemption notice to the
  coordination service; in the background every process's sync manager then
  agrees on a sync step (one past the furthest step any process has
  reported), and ``reached_preemption_sync_point(step)`` (of
  ``jax.experimental.multihost_utils``), a local check in each ``poll``, is
  true at that step on every process. JAX's own notifier is a C-level SIGTERM
  handler installed by ``jax.distributed.initialize``, which the Python
  handler of this class replaces (it logs and keeps the second-signal rule),
  so :meth:`JaxPreemptionService.notify` posts the notice itself, under the
  key JAX's notifier uses. A known race, JAX's: a step is "reported" by any
  call of ``reached_preemption_sync_point``, and Orbax also calls it, from
  its save-finalising thread with the saved (older) step; a notice arriving
  just then can set a sync step that the process furthest ahead has passed.
* Any signal (SIGINT, which the preemption service does not cover, or
  SIGTERM when the service is off or its notice is lost) is also agreed at
  every ``sync_every``-th step, by a ``process_allgather`` of the signal
  numbers there, one host synchronisation per ``sync_every`` steps. The
  trade-off: such a signal is honoured at the next multiple of
  ``sync_every`` steps (up to ``sync_every`` steps late, not at all if the run
  ends first); a smaller ``sync_every`` stops sooner but synchronises the
  hosts more often.

``poll()`` without a step keeps the older rule: with several processes it
combines the flags of all processes at every call.

Examples:
  >>> import os, signal
  >>> with StopRequest() as stop:
  ...   os.kill(os.getpid(), signal.SIGTERM)
  ...   stop.poll() == signal.SIGTERM
  True
  >>> with StopRequest(sync_every=10) as stop:  # one process: no agreement
  ...   before = stop.poll(1)
  ...   os.kill(os.getpid(), signal.SIGINT)
  ...   before, stop.poll(2) == signal.SIGINT
  (0, True)
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
from typing import Callable

from absl import logging
import jax
# JAX's coordination-service client and preemption sync manager of this
# process (the state ``multihost_utils`` itself reads).
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)
SYNC_EVERY = 100


class JaxPreemptionService:
  """JAX's preemption sync point, through the coordination service.

  Use :meth:`create`, which returns ``None`` where the service is off or
  there is no coordination service (no ``jax.distributed.initialize``).

  Examples:
    >>> JaxPreemptionService.create() is None  # one process, no service
    True
  """

  # The key-value entry JAX's SIGTERM notifier writes (the time of death, in
  # RFC 3339) and every process's preemption sync manager waits for.
  NOTICE_KEY = 'RECEIVED_PREEMPTION_NOTICE'

  def __init__(self, client):
    self._client = client

  @classmethod
  def create(cls) -> JaxPreemptionService | None:
    """The service of this process, or ``None`` where it is unavailable."""
    state = jax_distributed.global_state
    if (getattr(state, 'client', None) is None or
        getattr(state, 'preemption_sync_manager', None) is None):
      return None
    return cls(state.client)

  def notify(self) -> None:
    """Posts a preemption notice: every process starts agreeing on a step.

    A failure (another process posted first, a lost connection) is logged;
    the ``sync_every`` agreement of :class:`StopRequest` still stops the run.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    try:
      self._client.key_value_set(self.NOTICE_KEY,
                                 now.isoformat(timespec='microseconds'))
    except Exception as e:  # pylint: disable=broad-except
      logging.info('preemption notice not posted (%s); another process may '
                   'have posted one.', e)

  def reached(self, step: int) -> bool:
    """Whether ``step`` is the agreed step to stop at (same on all processes).

    Must be called at every step, with consecutive step numbers, on every
    process.
    """
    return bool(multihost_utils.reached_preemption_sync_point(step))


class StopRequest:
  """Records SIGTERM/SIGINT while active (a context manager).

  Args:
    signals: the signals to catch.
    sync_processes: agree on the stop step with the other JAX processes in
      :meth:`poll` (default: when ``jax.process_count() > 1``).
    sync_every: with several processes, ``poll(step)`` combines the signals
      of all processes (a host synchronisation) at the steps that are
      multiples of this; a signal the preemption service does not carry
      (SIGINT, or any signal when the service is off) is honoured there, up
      to this many steps late.
    allgather: gathers one number from every process into an array
      (default: ``jax.experimental.multihost_utils.process_allgather``).
    preemption_service: has ``notify()`` and ``reached(step)`` (see
      :class:`JaxPreemptionService`); ``None``: JAX's, where it is on;
      ``False``: none (SIGTERM is agreed every ``sync_every`` steps too).

  Raises:
    ValueError: if ``sync_every`` is not a positive int.

  Examples:
    >>> def allgather(x):  # stands for two processes; the other got SIGINT
    ...   gathered.append(int(x))
    ...   return np.array([int(x), int(signal.SIGINT)])
    >>> gathered = []
    >>> stop = StopRequest(sync_processes=True, sync_every=4,
    ...                    allgather=allgather, preemption_service=False)
    >>> [stop.poll(step) for step in range(1, 5)], gathered
    ([0, 0, 0, 2], [0])
  """

  def __init__(self, signals=SIGNALS, sync_processes: bool | None = None,
               sync_every: int = SYNC_EVERY, *,
               allgather: Callable[[np.ndarray], np.ndarray] | None = None,
               preemption_service=None):
    if (isinstance(sync_every, bool) or not isinstance(sync_every, int) or
        sync_every < 1):
      raise ValueError(f'sync_every={sync_every!r}: use a positive int.')
    self.signals = tuple(signals)
    self.signum = 0
    self.sync_every = sync_every
    self._previous = {}
    self._sync = sync_processes
    self._allgather = allgather
    self._service = preemption_service
    self._service_known = preemption_service is not None
    self._notified = False

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

  def _syncing(self) -> bool:
    if self._sync is None:
      self._sync = jax.process_count() > 1
    return self._sync

  def _gathered(self) -> int:
    """The largest signal number recorded by any process."""
    gather = self._allgather or multihost_utils.process_allgather
    return int(np.max(gather(np.int32(self.signum))))

  def _preemption_service(self):
    if not self._service_known:
      self._service = JaxPreemptionService.create()
      self._service_known = True
    return self._service or None

  def poll(self, step: int | None = None) -> int:
    """The signal to stop for at this step (0: go on), agreed by all processes.

    Args:
      step: the number of steps done. With it, the call is meant for every
        step (consecutive numbers, on every process) and synchronises the
        processes only every ``sync_every`` steps (see the module
        docstring); without it, the flags of all processes are combined at
        every call.

    Returns:
      The signal number, the same on every process for the same ``step``.

    Examples:
      >>> StopRequest(sync_processes=False).poll(7)  # no signal yet
      0
    """
    if not self._syncing():
      return self.signum
    if step is None:
      return self._gathered()
    signum = 0
    service = self._preemption_service()
    if service is not None:
      if self.signum == signal.SIGTERM and not self._notified:
        self._notified = True
        service.notify()
      if service.reached(step):
        signum = int(signal.SIGTERM)
    if step % self.sync_every == 0:
      signum = max(signum, self._gathered())
    return signum
