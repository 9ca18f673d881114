"""SIGTERM / SIGINT as a request to save and stop at a step boundary.

TPU VMs and batch schedulers preempt with SIGTERM; a user stops a run with
Ctrl-C (SIGINT). While training, :class:`StopRequest` replaces the handlers
of these signals (of SIGTERM only where JAX's preemption service, below,
does not carry it) by one that only records the signal; the loop calls
:meth:`StopRequest.poll` after every step, and when it returns a signal
number the loop saves a checkpoint and stops. A second signal while the
first is being handled restores the default action and re-sends itself (an
immediate stop, as before).

With several processes (``jax.process_count() > 1``) a signal may reach the
processes at different steps (or only one of them), yet every process must
stop at the same step and write the same checkpoint. ``poll(step)`` gets
them to agree without a host synchronisation per step (which would stop
JAX's asynchronous dispatch from running ahead of the devices):

* SIGTERM goes through JAX's preemption service where it is usable: several
  processes joined by ``jax.distributed.initialize``, which starts a
  preemption sync manager unless ``jax_enable_preemption_service`` is off
  (:meth:`JaxPreemptionService.create` tells, by calling
  ``reached_preemption_sync_point`` once and catching the error it raises
  where there is no manager). :class:`StopRequest` then leaves SIGTERM to
  the handler ``jax.distributed.initialize`` installed: a C-level one that
  only records the signal (the process goes on). Within about a second a
  background thread of the process that got it posts a preemption notice to
  the coordination service; every process's sync manager then agrees on a
  sync step (one past the furthest step any process has reported), and
  ``reached_preemption_sync_point(step)`` (of
  ``jax.experimental.multihost_utils``), a local check in each ``poll``, is
  true at that step on every process; ``poll`` logs it and returns SIGTERM.
  The costs: a second SIGTERM does not stop the process at once (JAX's
  handler ignores it), ``poll()`` without a step does not see SIGTERM, and
  a SIGTERM whose notice is lost or whose sync step is never reached is not
  honoured (the scheduler's SIGKILL ends the run; it resumes from the last
  checkpoint). A sync step is never reached when it was agreed before a
  process's first ``poll(step)`` from steps reported earlier: give
  ``start_step`` (the step a resumed run starts from), which the service
  check reports. A known race, JAX's: a step is "reported" by any call of
  ``reached_preemption_sync_point``, and Orbax also calls it, from its
  save-finalising thread with the saved (older) step; a notice arriving just
  then can set a sync step that the process furthest ahead has passed.
* Any signal that :class:`StopRequest` records (SIGINT, which the
  preemption service does not cover, and SIGTERM where the service is not
  usable) is agreed at every ``sync_every``-th step, by a
  ``process_allgather`` of the signal numbers there, one host
  synchronisation per ``sync_every`` steps. The trade-off: such a signal is
  honoured at the next multiple of ``sync_every`` steps (up to
  ``sync_every`` steps late, not at all if the run ends first); a smaller
  ``sync_every`` stops sooner but synchronises the hosts more often.

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

import os
import signal
import threading
from typing import Callable

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)
SYNC_EVERY = 100


class JaxPreemptionService:
  """JAX's preemption sync point, where JAX's SIGTERM notifier posts notices.

  Use :meth:`create`, which returns ``None`` where the service is not
  usable.

  Examples:
    >>> JaxPreemptionService.create() is None  # one process, no service
    True
  """

  @classmethod
  def create(cls, start_step: int = 0) -> JaxPreemptionService | None:
    """The service of this process, or ``None`` where it is not usable.

    Usable: ``jax.distributed.initialize`` joined several processes and
    started a preemption sync manager (``jax_enable_preemption_service``
    on). Where it may be, the check calls
    ``reached_preemption_sync_point(start_step)`` once (which reports
    ``start_step`` to the manager).

    Args:
      start_step: the number of steps done before the first
        :meth:`reached` (the step a resumed run starts from).
    """
    if not (jax.distributed.is_initialized() and jax.process_count() > 1 and
            getattr(jax.config, 'jax_enable_preemption_service', True)):
      return None
    try:
      multihost_utils.reached_preemption_sync_point(start_step)
    except RuntimeError as e:  # no preemption sync manager
      logging.info('JAX preemption service not usable (%s).', e)
      return None
    return cls()

  def reached(self, step: int) -> bool:
    """Whether ``step`` is the agreed step to stop at (same on all processes).

    Must be called at every step, with consecutive step numbers, on every
    process.
    """
    return bool(multihost_utils.reached_preemption_sync_point(step))


class StopRequest:
  """Records SIGTERM/SIGINT while active (a context manager).

  Where a preemption service is in use, SIGTERM is left to it (JAX's own
  handler stays in place) and only the other signals are caught.

  Args:
    signals: the signals to catch.
    sync_processes: agree on the stop step with the other JAX processes in
      :meth:`poll` (default: when ``jax.process_count() > 1``).
    sync_every: with several processes, ``poll(step)`` combines the signals
      of all processes (a host synchronisation) at the steps that are
      multiples of this; a signal the preemption service does not carry
      (SIGINT, or any signal where the service is not usable) is honoured
      there, up to this many steps late.
    allgather: gathers one number from every process into an array
      (default: ``jax.experimental.multihost_utils.process_allgather``).
    preemption_service: has ``reached(step)``, true at the agreed step after
      a SIGTERM it was notified of (see :class:`JaxPreemptionService`);
      ``None``: JAX's, where it is usable (decided on entering, or at the
      first :meth:`poll`); ``False``: none (SIGTERM is caught and agreed
      every ``sync_every`` steps too).
    start_step: the number of steps done before the first ``poll(step)``
      (the step a resumed run starts from): what the check for JAX's
      service reports to it.

  Raises:
    ValueError: if ``sync_every`` is not a positive int or ``start_step``
      not an int >= 0.

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
               preemption_service=None, start_step: int = 0):
    if (isinstance(sync_every, bool) or not isinstance(sync_every, int) or
        sync_every < 1):
      raise ValueError(f'sync_every={sync_every!r}: use a positive int.')
    if (isinstance(start_step, bool) or not isinstance(start_step, int) or
        start_step < 0):
      raise ValueError(f'start_step={start_step!r}: use an int >= 0.')
    self.signals = tuple(signals)
    self.signum = 0
    self.sync_every = sync_every
    self._previous = {}
    self._sync = sync_processes
    self._allgather = allgather
    self._service = preemption_service
    self._service_known = preemption_service is not None
    self._start_step = start_step

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
    # With a preemption service, SIGTERM stays with JAX's notifier.
    service = self._preemption_service()
    if threading.current_thread() is threading.main_thread():
      for s in self.signals:
        if service is None or s != signal.SIGTERM:
          self._previous[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def begin(self, start_step: int) -> None:
    """Tells the agreement the step the loop starts from (a resumed run).

    The stop request is entered before a run knows where it resumes; JAX's
    preemption sync manager counts steps from the last one reported, so
    the first step is reported here (before the first ``poll(step)``).

    Raises:
      ValueError: ``start_step`` is not an int >= 0.
    """
    if (isinstance(start_step, bool) or not isinstance(start_step, int) or
        start_step < 0):
      raise ValueError(f'start_step={start_step!r}: use an int >= 0.')
    service = self._preemption_service()
    if service is not None and start_step > self._start_step:
      service.reached(start_step)
    self._start_step = start_step

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
      self._service = (None if self._sync is False else
                       JaxPreemptionService.create(self._start_step))
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
    if service is not None and service.reached(step):
      signum = int(signal.SIGTERM)
      logging.warning("SIGTERM (via JAX's preemption service): saving at "
                      'step %d', step)
    if step % self.sync_every == 0:
      signum = max(signum, self._gathered())
    return signum
