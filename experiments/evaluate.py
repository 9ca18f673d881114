r"""Evaluates a checkpoint: ``python -m experiments.evaluate --workdir DIR``.

Reads the run's config from ``DIR/config.json``, restores the newest (or
``--step``) checkpoint and prints the top-1 / top-5 accuracy and loss on the
evaluation split, using the BatchNorm running statistics (as training's
evaluations do); ``--bn_recalibration_batches=N`` recomputes them first from
N training batches (see :mod:`experiments.train`). A workdir written by
:mod:`experiments.convert_official` (an official pretrained checkpoint)
evaluates the same way, with the official preprocessing of
:mod:`experiments.data` (CIFAR: the official mean/std; ImageNet: resize 256,
centre crop 224, ImageNet mean/std).

A workdir's config may name only models of the zoo: a ``model.name`` of the
form ``module:factory`` would import and run that module's code, and is
refused unless ``--trust_workdir_code`` is given. The checkpoint's checksums
are verified (a corrupt newest checkpoint falls back to the newest intact
one, with a warning). Expected errors print one line and exit 2
(``--traceback`` shows the traceback).

Example::

  python -m experiments.evaluate --workdir workdirs/lenet5_mnist
"""

import sys

from absl import app
from absl import flags

from experiments import errors

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this CLI's flags (only when run as a program, so that importing
  the module next to other CLIs never clashes on flag names)."""
  flags.DEFINE_string('workdir', None, 'Run directory.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: last).')
  flags.DEFINE_string('data_dir', None,
                      'Override dataset.data_dir (MNIST files).')
  flags.DEFINE_string('tfds_data_dir', None, 'Override dataset.tfds_data_dir.')
  flags.DEFINE_string('split', None, 'Override dataset.eval_split.')
  flags.DEFINE_integer('eval_batch_size', None, 'Override eval_batch_size.')
  flags.DEFINE_integer('bn_recalibration_batches', None,
                       'Recompute BN statistics from N batches.')
  flags.DEFINE_bool('trust_workdir_code', False,
                    'Allow the workdir\'s config.json to name a model '
                    '"module:factory" (imports and runs that module).')
  flags.DEFINE_bool('traceback', False,
                    'Show the traceback of expected errors.')
  flags.mark_flag_as_required('workdir')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    _evaluate()
  except errors.UserError as e:
    if errors.traceback_requested(FLAGS.traceback):
      raise
    print(errors.one_line(e), file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_USER_ERROR)


def _evaluate():
  from experiments import experiment  # pylint: disable=g-import-not-at-top
  from experiments import train  # pylint: disable=g-import-not-at-top
  config = experiment.load_config(FLAGS.workdir,
                             trust_code=FLAGS.trust_workdir_code)
  for flag, key in (('data_dir', 'dataset.data_dir'),
                    ('tfds_data_dir', 'dataset.tfds_data_dir'),
                    ('split', 'dataset.eval_split'),
                    ('eval_batch_size', 'eval_batch_size'),
                    ('bn_recalibration_batches', 'bn_recalibration_batches')):
    value = FLAGS[flag].value
    if value is not None:
      section, _, leaf = key.rpartition('.')
      (config[section] if section else config)[leaf] = value
  result = train.evaluate_checkpoint(config, FLAGS.workdir, FLAGS.step)
  print(f"checkpoint step {result['step']}: {config.dataset.name} "
        f"{config.dataset.eval_split}, {int(result['count'])} images")
  print(f"Test accuracy: {100 * result['top1']:.2f}% (top-5 "
        f"{100 * result['top5']:.2f}%, loss {result['loss']:.4f})")


def parse_flags(argv):
  """absl flag parsing; a bad flag is one line and exit 2."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f'error: {" ".join(str(e).split())} (see --help).', file=sys.stderr)
    sys.exit(errors.EXIT_USER_ERROR)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
