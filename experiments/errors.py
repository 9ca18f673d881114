"""Errors a user can fix, and how the command-line tools report them.

Every expected failure (a bad flag or config value, missing or corrupt data,
a busy or mismatched workdir, a corrupt checkpoint) raises a subclass of
:class:`UserError`. Every command-line program (:mod:`experiments.cli`)
prints such an error as one line on stderr and exits with
:data:`EXIT_USER_ERROR`; ``--traceback`` (or the environment variable
``ADDERJAX_TRACEBACK=1``) shows the full traceback instead.

Exit codes of the CLIs:

* ``0``: done;
* ``2`` (:data:`EXIT_USER_ERROR`): an expected error, printed as one line;
* ``3`` (:data:`EXIT_DIVERGED`): the loss became non-finite; the run stopped
  and its last good checkpoint stays;
* ``128 + signal`` (``143`` for SIGTERM, ``130`` for SIGINT/Ctrl-C): the run
  was told to stop, saved a checkpoint at the step boundary and exited; the
  same command resumes it.

Examples:
  >>> issubclass(ConfigError, UserError) and issubclass(ConfigError,
  ...                                                    ValueError)
  True
  >>> one_line(ConfigError('batch_size must be a positive int, got -1.'))
  'error: batch_size must be a positive int, got -1.'
"""

from __future__ import annotations

import os
import signal

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
TRACEBACK_ENV = 'ADDERJAX_TRACEBACK'


class UserError(Exception):
  """An error the user can fix: the CLIs print it as one line, exit 2."""


class ConfigError(UserError, ValueError):
  """A config key or value is unknown or out of range."""


class UsageError(UserError, ValueError):
  """The command line is wrong: an argument or a flag value the program
  does not take."""


class TrainingDivergedError(RuntimeError):
  """The training loss (or a parameter) became NaN or infinite."""


class Preempted(Exception):  # pylint: disable=g-bad-exception-name
  """The run got SIGTERM/SIGINT, saved a checkpoint and stopped.

  Attributes:
    signum: the signal received.
    step: the step of the checkpoint written.
  """

  def __init__(self, signum: int, step: int, message: str):
    super().__init__(message)
    self.signum = signum
    self.step = step

  @property
  def exit_code(self) -> int:
    """``128 + signum``, the shell's convention for a signal's exit."""
    return 128 + int(self.signum)


def signal_name(signum: int) -> str:
  """``'SIGTERM'`` for 15 etc.

  Examples:
    >>> signal_name(15), signal_name(2)
    ('SIGTERM', 'SIGINT')
  """
  try:
    return signal.Signals(signum).name
  except ValueError:
    return f'signal {signum}'


def one_line(error: BaseException) -> str:
  """The error as one ``error: ...`` line (newlines folded)."""
  text = ' '.join(str(error).split()) or type(error).__name__
  return f'error: {text}'


def traceback_requested(flag_value: bool = False) -> bool:
  """Whether the CLI should show tracebacks (flag or environment)."""
  env = os.environ.get(TRACEBACK_ENV, '').strip().lower()
  return bool(flag_value) or env in ('1', 'true', 'yes', 'on')
