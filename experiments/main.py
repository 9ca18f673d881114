r"""Trains one experiment: ``python -m experiments.main --config C --workdir D``.

Examples::

  python -m experiments.main --config experiments/configs/lenet5_mnist.py \
      --workdir workdirs/lenet5_adder
  python -m experiments.main --config experiments/configs/lenet5_mnist.py:cnn \
      --workdir workdirs/lenet5_cnn --config.num_epochs=50
  python -m experiments.main --config experiments/configs/resnet20_cifar10.py \
      --workdir workdirs/r20 --config.parallelism=pmap

Config values are overridden with ``--config.KEY=VALUE``; unknown keys are an
error. Re-running with the same ``--workdir`` resumes from its last
checkpoint. Multi-process: pass ``--coordinator_address``,
``--num_processes`` and ``--process_id`` (or set ``JAX_COORDINATOR_ADDRESS``;
on TPU pods ``--distributed=on``).
"""

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from experiments import parallel

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
  flags.mark_flags_as_required(['config', 'workdir'])


def _quiet_orbax(record) -> bool:
  """Drops Orbax's INFO chatter (several lines per checkpoint)."""
  return record.levelno >= std_logging.WARNING or (
      'orbax' not in record.pathname)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_logger().addFilter(_quiet_orbax)
  parallel.maybe_initialize_distributed(
      FLAGS.distributed, coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  logging.info('JAX: %d processes, %d devices (%d local): %s',
               jax.process_count(), jax.device_count(),
               jax.local_device_count(), jax.devices()[:4])
  from experiments import train  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                           init_from=FLAGS.init_from)


def parse_flags(argv):
  """absl flag parsing, with a clear message for unknown config keys."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: no such key
    key = str(e).strip('"\'')
    overrides = [a.split('=')[0] for a in argv[1:]
                 if a.startswith('--config.')]
    bad = [o for o in overrides if o.rsplit('.', 1)[-1] == key] or overrides
    print(f'error: unknown config key {key!r} in {", ".join(bad)}; the valid '
          'keys are those of experiments/configs/default.py (see '
          '--helpfull).', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
