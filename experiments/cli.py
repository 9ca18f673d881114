r"""The command line of every experiment entry point: one convention.

Every entry point (:mod:`experiments.main`, ``evaluate``, ``quantize``,
``aot``, ``convert_official``, ``fetch_data``, ``reproduce`` and the
``experiments.benchmarks`` programs) is a module with

* a docstring: the text of ``--help``, followed by the flags (and, where the
  program takes a ``--config``, every config key with its default);
* ``define_flags(flag_values)``: its absl flags, defined on the
  ``flags.FlagValues`` it is given (``flags.DEFINE_string(...,
  flag_values=flag_values)``), so that programs never clash on flag names;
* ``main(flag_values, args) -> int | None``: the work, with the parsed flags
  and the positional arguments;

and ends with::

  if __name__ == '__main__':
    cli.run(main, define_flags)

The convention, the same for every program:

* flags are absl flags: ``--flag=value``, ``--flag value``, ``--boolflag`` /
  ``--noboolflag``; a config file is ``--config path/to/config.py[:arg]`` with
  ``--config.KEY=VALUE`` overrides (``ml_collections.config_flags``, loaded by
  :func:`load_config_file`); every program has ``--traceback``;
* an expected error (a bad flag, an unknown ``--config.KEY``, a bad config
  value, a missing file, any :class:`experiments.errors.UserError`) prints one
  line ``error: ...`` on stderr and exits 2; a diverged run exits 3; a run
  stopped by a signal exits ``128 + signum`` (:mod:`experiments.errors`);
  ``--traceback`` or ``ADDERJAX_TRACEBACK=1`` shows the traceback instead.

:func:`call` runs an entry point in this process (tests, notebooks) with a
fresh ``FlagValues``: the same output and exit codes as the program (an
error raises ``SystemExit``).

Examples:
  >>> from absl import flags
  >>> def define_flags(flag_values):
  ...   _ = flags.DEFINE_integer('n', 1, 'How many.',
  ...                            flag_values=flag_values)
  >>> def main(flag_values, args):
  ...   print('n =', flag_values.n)
  >>> call(main, define_flags, ['--n', '3'])
  n = 3
  0
"""

from __future__ import annotations

import contextvars
import functools
import importlib.util
import logging as std_logging
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from experiments import errors
from experiments.configs import default as default_config

# Flags defined by the helpers below belong to the entry point that calls
# them (they show in its --help).
flags.disclaim_key_flags()

Main = Callable[[flags.FlagValues, list], Any]
DefineFlags = Callable[[flags.FlagValues], None]

#: The command line being parsed by :func:`call` (``None``: ``sys.argv``);
#: ``config_flags`` reads the ``--config.KEY`` overrides from it.
_ARGV: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    'adderjax_cli_argv', default=None)


# ----------------------------------------------------------------------------
# Config files.


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """``'path/to/config.py[:arg]'`` -> ``get_config(arg)`` of that file.

  The one loader of config files: ``--config`` (:func:`define_config_file`)
  and every program that takes a config path use it.

  Args:
    spec: a Python file defining ``get_config()``; text after the first
      ``:`` is passed to it as its argument.

  Returns:
    What ``get_config`` returns.

  Raises:
    experiments.errors.ConfigError: the file does not exist, is not a
      ``.py`` file, raises on import, has no ``get_config``, or
      ``get_config`` rejects the argument (a one-line message naming the
      path).

  Examples:
    >>> load_config_file('experiments/configs/lenet5_mnist.py:cnn').model.kind
    'cnn'
    >>> load_config_file('configs/nothing.py')
    Traceback (most recent call last):
    ...
    experiments.errors.ConfigError: config file 'configs/nothing.py' does not exist.
  """
  path, sep, arg = spec.partition(':')
  if not path:
    raise errors.ConfigError(f'config file {spec!r}: no path (expected '
                             'path/to/config.py[:arg]).')
  if not os.path.exists(path):
    raise errors.ConfigError(f'config file {path!r} does not exist.')
  if not os.path.isfile(path) or not path.endswith('.py'):
    raise errors.ConfigError(f'config file {path!r} is not a Python file '
                             '(expected path/to/config.py[:arg]).')
  name = '_adderjax_config_' + re.sub(
      r'\W', '_', os.path.splitext(os.path.basename(path))[0])
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.ConfigError(
        f'config file {path!r} failed to load: {type(e).__name__}: '
        f'{_squeeze(e)}') from e
  get_config = getattr(module, 'get_config', None)
  if not callable(get_config):
    raise errors.ConfigError(f'config file {path!r} defines no get_config() '
                             'function.')
  try:
    return get_config(arg) if sep else get_config()
  except errors.UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise errors.ConfigError(f'config {spec!r}: {_squeeze(e)}') from e


class _ConfigFileParser(flags.ArgumentParser):
  """The parser of ``--config``: :func:`load_config_file`, then lock."""

  def parse(self, argument):
    config = load_config_file(argument)
    if callable(getattr(config, 'lock', None)):
      config.lock()
    return config

  def flag_type(self):
    return 'config object'


def define_config_file(flag_values: flags.FlagValues, name: str = 'config',
                       help_string: str = 'Experiment config file '
                       '(experiments/configs/*.py[:ARG]).',
                       required: bool = True) -> None:
  """Defines ``--config FILE[:ARG]`` with ``--config.KEY=VALUE`` overrides.

  ``ml_collections.config_flags.DEFINE_config_file``, the file loaded by
  :func:`load_config_file`; unknown keys are an error (the config is
  locked).
  """
  config_flags.DEFINE_config_file(name, None, help_string,
                                  flag_values=flag_values, lock_config=True,
                                  sys_argv=_ARGV.get())
  flag_values[name].parser = _ConfigFileParser()
  if required:
    flags.mark_flag_as_required(name, flag_values=flag_values)


def config_file_name(flag_values: flags.FlagValues,
                     name: str = 'config') -> str:
  """The ``path[:arg]`` given to ``--config``."""
  return config_flags.get_config_filename(flag_values[name])


# ----------------------------------------------------------------------------
# Flags.


class _ValuesParser(flags.ListParser):
  """Comma- (or, on the command line, space-) separated values of a type."""

  def __init__(self, item: Callable[[str], Any]):
    super().__init__()
    self._item = item

  def parse(self, argument):
    values = super().parse(argument)
    try:
      return [self._item(v) for v in values]
    except ValueError:
      raise ValueError(f'expected comma-separated {self._item.__name__}s, '
                       f'got {argument!r}') from None

  def flag_type(self):
    return f'comma separated list of {self._item.__name__}s'


class _ValuesFlag(flags.Flag):
  """A list flag whose values may also follow it as separate arguments."""


def define_list(name: str, default: Sequence[Any] | None, help_string: str,
                flag_values: flags.FlagValues,
                item: Callable[[str], Any] = str) -> None:
  """Defines ``--name a,b,c`` (also ``--name a b c``), values of ``item``.

  Examples:
    >>> from absl import flags
    >>> fv = flags.FlagValues()
    >>> define_list('batches', [64], 'Batch sizes.', fv, item=int)
    >>> parse_flags(['prog', '--batches', '32', '128'], fv), fv.batches
    (['prog'], [32, 128])
  """
  flags.DEFINE_flag(_ValuesFlag(
      _ValuesParser(item), flags.CsvListSerializer(','), name,
      None if default is None else ','.join(map(str, default)), help_string),
      flag_values)


def _join_values(argv: Sequence[str], flag_values: flags.FlagValues
                 ) -> list[str]:
  """``--name a b`` -> ``--name=a,b`` for the :func:`define_list` flags."""
  names = {f'--{n}' for n in flag_values
           if isinstance(flag_values[n], _ValuesFlag)}
  out, i = [], 0
  while i < len(argv):
    arg = argv[i]
    i += 1
    if i > 1 and arg in names:
      values = []
      while i < len(argv) and not argv[i].startswith('-'):
        values.append(argv[i])
        i += 1
      out.append(f'{arg}={",".join(values)}' if values else arg)
    else:
      out.append(arg)
  return out


def _squeeze(error: BaseException) -> str:
  return ' '.join(str(error).split()) or type(error).__name__


def _usage_error(message: str) -> NoReturn:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(errors.EXIT_USER_ERROR)


def parse_flags(argv: Sequence[str],
                flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """Parses ``argv`` (``argv[0]`` the program) into ``flag_values``.

  Returns:
    ``argv`` without the flags: the program, then the positional arguments.

  A bad flag or value, or an unknown ``--config.KEY``, prints one line
  ``error: ...`` and exits 2 (with ``--traceback`` in ``argv`` or
  ``ADDERJAX_TRACEBACK=1``, the error propagates with its traceback).

  Examples:
    >>> from absl import flags
    >>> fv = flags.FlagValues()
    >>> _ = flags.DEFINE_integer('n', 1, 'How many.', flag_values=fv)
    >>> parse_flags(['prog', '--n=2', 'extra'], fv), fv.n
    (['prog', 'extra'], 2)
  """
  argv = _join_values(list(argv), flag_values)
  show = errors.traceback_requested(_traceback_in(argv))
  try:
    return flag_values(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: no such key
    if show:
      raise
    key = str(e).strip('"\'')
    overrides = [a.split('=')[0] for a in argv[1:] if a.startswith('--')
                 and '.' in a.split('=')[0]]
    bad = [o for o in overrides if o.rsplit('.', 1)[-1] == key] or overrides
    _usage_error(f'unknown config key {key!r} in {", ".join(bad)}; the valid '
                 'keys are listed by --help (experiments/configs/'
                 'default.py).')
  except flags.Error as e:
    if show:
      raise
    cause = e.__context__ or e.__cause__
    if isinstance(cause, errors.UserError):  # e.g. load_config_file
      _usage_error(_squeeze(cause))
    _usage_error(f'{_squeeze(e)} (see --help).')
  except errors.UserError as e:
    if show:
      raise
    _usage_error(_squeeze(e))
  except (ValueError, TypeError) as e:  # a --config.KEY value
    if show:
      raise
    _usage_error(f'{_squeeze(e)} (see --help).')


def _traceback_in(argv: Sequence[str]) -> bool:
  """Whether ``argv`` turns ``--traceback`` on (read before the flags are).

  Examples:
    >>> _traceback_in(['prog', '--traceback', '--n=2'])
    True
    >>> _traceback_in(['prog', '--traceback', '--notraceback'])
    False
  """
  on = False
  for arg in argv[1:]:
    if arg == '--':
      break
    if arg in ('--traceback', '--traceback=true', '--traceback=True',
               '--traceback=1'):
      on = True
    elif arg in ('--notraceback', '--traceback=false', '--traceback=False',
                 '--traceback=0'):
      on = False
  return on


def _define(define_flags: DefineFlags, flag_values: flags.FlagValues) -> None:
  define_flags(flag_values)
  if 'traceback' not in flag_values:
    flags.DEFINE_bool('traceback', False, 'Show the traceback of expected '
                      'errors (normally one line; also ADDERJAX_TRACEBACK=1).',
                      flag_values=flag_values)


def command_line(module: str, flag_values: flags.FlagValues,
                 args: Sequence[str] = ()) -> str:
  """The command that reruns this invocation (the flags given, as given).

  Examples:
    >>> from absl import flags
    >>> fv = flags.FlagValues()
    >>> _ = flags.DEFINE_string('out', None, 'Where.', flag_values=fv)
    >>> _ = parse_flags(['prog', 'mnist', '--out', 'my dir'], fv)
    >>> command_line('experiments.reproduce', fv, ['mnist'])
    "python -m experiments.reproduce mnist '--out=my dir'"
  """
  parts = ['python', '-m', module, *args]
  for name in flag_values:
    flag = flag_values[name]
    if flag.present and flag.name == name:
      parts.append(flag.serialize())
  return ' '.join(shlex.quote(p) for p in parts)


# ----------------------------------------------------------------------------
# Errors, workdirs, help.


def run_reporting_errors(fn: Callable[[], Any], show_traceback: bool) -> Any:
  """Runs ``fn()``; expected errors become one stderr line and an exit code.

  :class:`experiments.errors.UserError`: exit 2;
  :class:`~experiments.errors.TrainingDivergedError`: exit 3;
  :class:`~experiments.errors.Preempted`: ``128 + signum``. With
  ``show_traceback`` the error propagates instead.
  """
  try:
    return fn()
  except errors.Preempted as e:
    if show_traceback:
      raise
    print(f'stopped: {e}', file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  except errors.TrainingDivergedError as e:
    if show_traceback:
      raise
    print(errors.one_line(e), file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_DIVERGED)
  except errors.UserError as e:
    if show_traceback:
      raise
    print(errors.one_line(e), file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_USER_ERROR)


def check_workdir(path: str, flag: str = '--workdir') -> None:
  """Raises a UserError unless ``path`` is, or can become, a writable dir.

  Nothing is created: an existing ``path`` must be a writable directory;
  else its nearest existing parent must be one.

  Examples:
    >>> import tempfile
    >>> check_workdir(os.path.join(tempfile.mkdtemp(), 'new', 'run'))
    >>> check_workdir(__file__, '--out')  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    experiments.errors.UsageError: --out .../cli.py is a file, not a directory.
  """
  if not path:
    raise errors.UsageError(f'{flag} is empty.')
  if os.path.exists(path) and not os.path.isdir(path):
    raise errors.UsageError(f'{flag} {path} is a file, not a directory.')
  parent = os.path.abspath(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise errors.UsageError(f'{flag} {path}: {parent} is a file, not a '
                            'directory.')
  if not os.access(parent, os.W_OK | os.X_OK):
    raise errors.UsageError(f'{flag} {path}: {parent} is not writable.')


def help_text(doc: str, flag_values: flags.FlagValues) -> str:
  """``doc``, plus every config key with its default if a flag takes one."""
  if not any(isinstance(flag_values[n].parser, _ConfigFileParser)
             for n in flag_values):
    return doc
  keys = '\n'.join('  ' + line for line in default_config.describe_keys())
  return (f'{doc}\nConfig keys (--config.KEY=VALUE) and their defaults '
          f'(experiment configs override some):\n{keys}\n')


# ----------------------------------------------------------------------------
# Running an entry point.


def no_arguments(args: Sequence[str]) -> None:
  """Raises a UsageError if a program that takes none got arguments."""
  if args:
    raise errors.UsageError(f'unexpected arguments {list(args)} (see '
                            '--help).')


def _run_main(main: Main, flag_values: flags.FlagValues,
              args: list[str]) -> int:
  show = errors.traceback_requested(flag_values.traceback)
  status = run_reporting_errors(lambda: main(flag_values, args), show)
  return 0 if status is None else int(status)


def call(main: Main, define_flags: DefineFlags,
         argv: Sequence[str] = (), program: str = 'adderjax') -> int:
  """Runs an entry point in this process, as the shell would run it.

  Args:
    main: the entry point's ``main(flag_values, args)``.
    define_flags: its ``define_flags(flag_values)``.
    argv: the command line after the program name.
    program: ``argv[0]``.

  Returns:
    The exit status of a run that finished (``main``'s return value, 0 for
    ``None``).

  Raises:
    SystemExit: where the program would exit with an error (one line on
      stderr first, as :func:`run`).
  """
  flag_values = flags.FlagValues()
  argv = [program, *argv]
  token = _ARGV.set(argv)
  try:
    _define(define_flags, flag_values)
  finally:
    _ARGV.reset(token)
  args = parse_flags(argv, flag_values)[1:]
  return _run_main(main, flag_values, args)


def quiet_orbax(record) -> bool:
  """A log filter: drops Orbax's chatter below ERROR (lines per checkpoint).

  Orbax's own ERROR records are dropped too where the checkpoint layer
  reports the problem itself in one line (a corrupt file's JSON, for
  instance); everything else passes.

  Examples:
    >>> import logging as std_logging
    >>> r = std_logging.LogRecord('x', std_logging.INFO, '/o/orbax/c.py', 1,
    ...                           'm', None, None)
    >>> quiet_orbax(r)
    False
  """
  return ('orbax' not in record.pathname or
          record.levelno >= std_logging.CRITICAL)


def run(main: Main, define_flags: DefineFlags) -> NoReturn:
  """The ``if __name__ == '__main__':`` of every entry point.

  Defines the flags on absl's global ``FLAGS`` (with absl's own: ``--help``,
  ``--helpfull``, ``--flagfile``, the logging flags), makes the module
  docstring the ``--help`` text (with the config keys where a ``--config``
  is taken), parses the command line with :func:`parse_flags` and runs
  ``main`` under :func:`run_reporting_errors` through ``absl.app.run``.
  """
  flag_values = flags.FLAGS
  _define(define_flags, flag_values)
  logging.get_absl_logger().addFilter(quiet_orbax)
  module = sys.modules['__main__']
  module.__doc__ = help_text(module.__doc__ or '', flag_values)
  app.run(lambda argv: _run_main(main, flag_values, argv[1:]),
          flags_parser=functools.partial(parse_flags,
                                         flag_values=flag_values))
