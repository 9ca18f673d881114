r"""Trains one experiment: ``python -m experiments.main --config C --workdir D``.

Examples::

  python -m experiments.main --config experiments/configs/lenet5_mnist.py \
      --workdir workdirs/lenet5_adder
  python -m experiments.main --config experiments/configs/lenet5_mnist.py:cnn \
      --workdir workdirs/lenet5_cnn --config.num_epochs=50
  python -m experiments.main --config experiments/configs/resnet20_cifar10.py \
      --workdir workdirs/r20 --config.parallelism=pmap

Config values are overridden with ``--config.KEY=VALUE``; unknown keys are an
error (the keys and their defaults are listed at the end of ``--help``).
Re-running with the same ``--workdir`` resumes from its last checkpoint; a
second run on a workdir in use is refused. Multi-process: pass
``--coordinator_address``, ``--num_processes`` and ``--process_id`` (or set
``JAX_COORDINATOR_ADDRESS``; on TPU pods ``--distributed=on``).

On a machine without a TPU, set ``JAX_PLATFORMS=cpu`` (the Makefile does):
the installed libtpu otherwise prints errors while JAX looks for a TPU.

Exit status: 0 done; 2 an expected error (bad flag or config value, missing
or corrupt data, busy or mismatched workdir, corrupt checkpoint), printed as
one line (``--traceback`` or ``ADDERJAX_TRACEBACK=1`` shows the traceback);
3 the loss became non-finite (the last good checkpoint stays); 143 (SIGTERM)
or 130 (SIGINT, Ctrl-C): a checkpoint was saved at the step boundary and the
same command resumes the run.
"""

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import errors

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this CLI's flags (only when run as a program, so that importing
  the module next to other CLIs never clashes on flag names)."""
  config_flags.DEFINE_config_file(
      'config', None,
      'Experiment config file (experiments/configs/*.py[:ARG]).',
      lock_config=True)
  flags.DEFINE_string('workdir', None,
                      'Directory for checkpoints and metrics.')
  flags.DEFINE_enum(
      'distributed', 'auto', ['auto', 'on', 'off'],
      'Call jax.distributed.initialize(): auto = when a coordinator is given '
      'by flag or environment.')
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
  flags.DEFINE_integer('num_processes', None, 'Number of processes.')
  flags.DEFINE_integer('process_id', None, 'This process\'s index.')
  flags.DEFINE_string('init_from', None,
                      'Start a new run from the weights of this run '
                      'directory (e.g. experiments.convert_official).')
  flags.DEFINE_bool('traceback', False,
                    'Show the traceback of expected errors (normally one '
                    'line).')
  flags.mark_flags_as_required(['config', 'workdir'])


def _quiet_orbax(record) -> bool:
  """Drops Orbax's INFO chatter (several lines per checkpoint)."""
  return record.levelno >= std_logging.WARNING or (
      'orbax' not in record.pathname)


def run_reporting_errors(fn, show_traceback: bool):
  """Runs ``fn()``; expected errors become one stderr line and an exit code.

  See :mod:`experiments.errors` for the exit codes.
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_logger().addFilter(_quiet_orbax)
  show = errors.traceback_requested(FLAGS.traceback)

  def run():
    if _single_process():
      # Refuse a busy workdir at once, before JAX's slow start-up.
      from experiments import workdir_lock  # pylint: disable=g-import-not-at-top
      workdir_lock.WorkdirLock(FLAGS.workdir).probe()
    import jax  # pylint: disable=g-import-not-at-top
    from experiments import parallel  # pylint: disable=g-import-not-at-top
    parallel.maybe_initialize_distributed(
        FLAGS.distributed, coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    logging.info('JAX: %d processes, %d devices (%d local): %s',
                 jax.process_count(), jax.device_count(),
                 jax.local_device_count(), jax.devices()[:4])
    from experiments import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                             init_from=FLAGS.init_from)
  run_reporting_errors(run, show)


def _single_process() -> bool:
  """Whether this run is surely one process (no coordinator anywhere)."""
  import os  # pylint: disable=g-import-not-at-top
  if FLAGS.distributed == 'on' or FLAGS.coordinator_address:
    return False
  if FLAGS.distributed == 'off':
    return True
  return not os.environ.get('JAX_COORDINATOR_ADDRESS') and (
      FLAGS.num_processes in (None, 1))


def _usage_error(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(errors.EXIT_USER_ERROR)


def parse_flags(argv):
  """absl flag parsing; bad flags and config keys are one line, exit 2."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: no such key
    key = str(e).strip('"\'')
    overrides = [a.split('=')[0] for a in argv[1:]
                 if a.startswith('--config.')]
    bad = [o for o in overrides if o.rsplit('.', 1)[-1] == key] or overrides
    _usage_error(f'unknown config key {key!r} in {", ".join(bad)}; the valid '
                 'keys are listed by --help (experiments/configs/'
                 'default.py).')
  except flags.Error as e:
    _usage_error(f'{" ".join(str(e).split())} (see --help).')
  except errors.UserError as e:  # a config file's own checks
    _usage_error(' '.join(str(e).split()))
  except (ValueError, TypeError) as e:  # a config file's argument, a value
    _usage_error(f'{" ".join(str(e).split())} (see --help).')


def _help_with_config_keys() -> str:
  from experiments.configs import default  # pylint: disable=g-import-not-at-top
  keys = '\n'.join('  ' + line for line in default.describe_keys())
  return (f'{__doc__}\nConfig keys (--config.KEY=VALUE) and their defaults '
          f'(experiment configs override some):\n{keys}\n')


if __name__ == '__main__':
  sys.modules['__main__'].__doc__ = _help_with_config_keys()
  define_flags()
  app.run(main, flags_parser=parse_flags)
