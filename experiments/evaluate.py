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

Example::

  python -m experiments.evaluate --workdir workdirs/lenet5_adder
"""

from absl import app
from absl import flags

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
  flags.mark_flag_as_required('workdir')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from experiments import train  # pylint: disable=g-import-not-at-top
  config = train.load_config(FLAGS.workdir)
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


if __name__ == '__main__':
  define_flags()
  app.run(main)
