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

import os

from absl import flags
from absl import logging
import jax

from experiments import cli
from experiments import parallel
from experiments import train
from experiments import workdir_lock


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines this program's flags on ``flag_values``."""
  cli.define_config_file(flag_values)
  flags.DEFINE_string('workdir', None,
                      'Directory for checkpoints and metrics.',
                      flag_values=flag_values)
  flags.DEFINE_enum(
      'distributed', 'auto', ['auto', 'on', 'off'],
      'Call jax.distributed.initialize(): auto = when a coordinator is given '
      'by flag or environment.', flag_values=flag_values)
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.',
                      flag_values=flag_values)
  flags.DEFINE_integer('num_processes', None, 'Number of processes.',
                       lower_bound=1, flag_values=flag_values)
  flags.DEFINE_integer('process_id', None, 'This process\'s index.',
                       lower_bound=0, flag_values=flag_values)
  flags.DEFINE_string('init_from', None,
                      'Start a new run from the weights of this run '
                      'directory (e.g. experiments.convert_official).',
                      flag_values=flag_values)
  flags.mark_flag_as_required('workdir', flag_values=flag_values)


def main(flag_values: flags.FlagValues, args: list[str]) -> None:
  """Trains ``--config`` in ``--workdir`` (resuming a run there)."""
  cli.no_arguments(args)
  cli.check_workdir(flag_values.workdir)
  if _single_process(flag_values):
    # Refuse a busy workdir at once, before JAX starts its backends.
    workdir_lock.WorkdirLock(flag_values.workdir).probe()
  parallel.maybe_initialize_distributed(
      flag_values.distributed,
      coordinator_address=flag_values.coordinator_address,
      num_processes=flag_values.num_processes,
      process_id=flag_values.process_id)
  logging.info('JAX: %d processes, %d devices (%d local): %s',
               jax.process_count(), jax.device_count(),
               jax.local_device_count(), jax.devices()[:4])
  train.train_and_evaluate(flag_values.config, flag_values.workdir,
                           init_from=flag_values.init_from)


def _single_process(flag_values: flags.FlagValues) -> bool:
  """Whether this run is surely one process (no coordinator anywhere)."""
  if flag_values.distributed == 'on' or flag_values.coordinator_address:
    return False
  if flag_values.distributed == 'off':
    return True
  return not os.environ.get('JAX_COORDINATOR_ADDRESS') and (
      flag_values.num_processes in (None, 1))


if __name__ == '__main__':
  cli.run(main, define_flags)
