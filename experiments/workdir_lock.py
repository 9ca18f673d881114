"""One run per workdir: a lock file naming its holder.

``workdir/.lock`` holds JSON ``{"pid", "hostname", "started"}`` of the run
that owns the workdir. It is created with ``O_CREAT | O_EXCL`` and, while the
run lives, also held with ``fcntl.flock`` (released by the kernel when the
process dies, whatever kills it). A second run is refused at once with a
:class:`WorkdirBusyError` naming the holder.

A lock left behind by a killed run (SIGKILL, a crash, a reboot) is stale
when its process is gone: same host and the pid is not alive, or the same
pid is alive but does not hold the ``flock`` (the pid was reused). A stale
lock is taken over with a warning. A lock held on another host cannot be
checked from here: it is refused, with the path to delete once that run is
known to be gone.

Examples:
  >>> import tempfile
  >>> d = tempfile.mkdtemp()
  >>> lock = WorkdirLock(d)
  >>> lock.acquire()
  >>> try:
  ...   WorkdirLock(d).acquire()
  ... except WorkdirBusyError as e:
  ...   print('in use by another run (pid' in str(e))
  True
  >>> lock.release()
  >>> WorkdirLock(d).acquire()  # free again
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket

from absl import logging

from experiments import errors

LOCK_FILE = '.lock'


class WorkdirBusyError(errors.UserError, RuntimeError):
  """Another live run holds the workdir."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  return True


def _read_holder(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.loads(f.read() or 'null')
  except (OSError, ValueError):
    return None


def describe_holder(holder: dict | None) -> str:
  """``pid 12 on host h, started 2026-01-01T00:00:00Z``.

  Examples:
    >>> describe_holder({'pid': 12, 'hostname': 'h',
    ...                  'started': '2026-01-01T00:00:00Z'})
    'pid 12 on host h, started 2026-01-01T00:00:00Z'
    >>> describe_holder(None)
    'an unknown process (unreadable lock file)'
  """
  if not holder:
    return 'an unknown process (unreadable lock file)'
  return (f"pid {holder.get('pid')} on host {holder.get('hostname')}, "
          f"started {holder.get('started')}")


class WorkdirLock:
  """The lock of one workdir (see the module docstring).

  Args:
    workdir: the run directory (created by :meth:`acquire` if missing).
  """

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self._fd = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def _busy(self, holder, extra=''):
    return WorkdirBusyError(
        f'workdir {self.workdir} is in use by another run '
        f'({describe_holder(holder)}){extra}. Wait for it to finish, stop '
        'it, or use another --workdir.')

  def acquire(self) -> None:
    """Takes the lock, or raises :class:`WorkdirBusyError` at once."""
    if self._fd is not None:
      return
    os.makedirs(self.workdir, exist_ok=True)
    me = {'pid': os.getpid(), 'hostname': socket.gethostname(),
          'started': datetime.datetime.now(datetime.timezone.utc).strftime(
              '%Y-%m-%dT%H:%M:%SZ')}
    for _ in range(20):
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        if self._take_over_if_stale():
          continue
        raise self._busy(_read_holder(self.path))  # pylint: disable=raise-missing-from
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError:  # someone else took it over in between
        os.close(fd)
        continue
      os.write(fd, json.dumps(me).encode())
      os.fsync(fd)
      self._fd = fd
      return
    raise self._busy(_read_holder(self.path), ' (the lock kept changing)')

  def _take_over_if_stale(self) -> bool:
    """Removes a stale lock file; False if it belongs to a live run."""
    try:
      fd = os.open(self.path, os.O_RDWR)
    except FileNotFoundError:
      return True  # released in the meantime: try again
    try:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          return False  # a live process holds it
        raise
      holder = _read_holder(self.path)
      if holder is None:
        # Being written by its creator (between O_EXCL and the write), or
        # garbage: treat a non-empty unreadable file as stale.
        if os.fstat(fd).st_size == 0:
          return False
      elif holder.get('hostname') != socket.gethostname():
        raise self._busy(holder, f'; it cannot be checked from host '
                         f'{socket.gethostname()}: if that run is gone, '
                         f'delete {self.path}')
      elif holder.get('pid') != os.getpid() and _pid_alive(
          int(holder.get('pid', -1))) and not _flock_supported(fd):
        return False
      logging.warning('Removing the stale lock of %s (%s is gone).',
                      self.workdir, describe_holder(holder))
      # Only remove the file we inspected (not a fresh one made meanwhile).
      try:
        if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
          os.unlink(self.path)
      except FileNotFoundError:
        pass
      return True
    finally:
      os.close(fd)

  def probe(self) -> None:
    """Raises :class:`WorkdirBusyError` if a live local run holds the lock.

    Changes nothing (a cheap early check before a slow start-up; the run
    still takes the lock with :meth:`acquire`).
    """
    try:
      fd = os.open(self.path, os.O_RDONLY)
    except OSError:
      return
    try:
      fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise self._busy(_read_holder(self.path)) from None
      raise
    finally:
      os.close(fd)

  def release(self) -> None:
    """Deletes the lock file and releases the lock (idempotent)."""
    if self._fd is None:
      return
    try:
      if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
        os.unlink(self.path)
    except FileNotFoundError:
      pass
    finally:
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


def _flock_supported(fd: int) -> bool:
  """Whether flock on this file system excludes other processes.

  We hold ``fd``'s lock; a second open file description must be refused.
  """
  path = f'/proc/self/fd/{fd}'
  try:
    other = os.open(path, os.O_RDONLY)
  except OSError:
    return True
  try:
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    return True
  else:
    fcntl.flock(other, fcntl.LOCK_UN)
    return False
  finally:
    os.close(other)
