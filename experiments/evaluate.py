r"""Evaluates a checkpoint: ``python -m experiments.evaluate --workdir DIR``.

Reads the run's config from ``DIR/config.json``, restores the newest (or
``--step``) checkpoint and prints the top-1 / top-5 accuracy and loss on the
evaluation split, using the BatchNorm running statistics (as training's
evaluations do); ``--bn_recalibration_batches=N`` recomputes them first from
N training batches (see :mod:`experiments.train`).

Example::

  python -m experiments.evaluate --workdir workdirs/lenet5_adder
"""

from absl import app
from absl import flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: last).')
_DATA_DIR = flags.DEFINE_string('data_dir', None,
                                'Override dataset.data_dir (MNIST files).')
_TFDS_DATA_DIR = flags.DEFINE_string('tfds_data_dir', None,
                                     'Override dataset.tfds_data_dir.')
_SPLIT = flags.DEFINE_string('split', None, 'Override dataset.eval_split.')
_BATCH = flags.DEFINE_integer('eval_batch_size', None,
                              'Override eval_batch_size.')
_RECAL = flags.DEFINE_integer('bn_recalibration_batches', None,
                              'Recompute BN statistics from N batches.')
flags.mark_flag_as_required('workdir')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from experiments import train  # pylint: disable=g-import-not-at-top
  config = train.load_config(_WORKDIR.value)
  for flag, key in ((_DATA_DIR, 'dataset.data_dir'),
                    (_TFDS_DATA_DIR, 'dataset.tfds_data_dir'),
                    (_SPLIT, 'dataset.eval_split'),
                    (_BATCH, 'eval_batch_size'),
                    (_RECAL, 'bn_recalibration_batches')):
    if flag.value is not None:
      section, _, leaf = key.rpartition('.')
      (config[section] if section else config)[leaf] = flag.value
  result = train.evaluate_checkpoint(config, _WORKDIR.value, _STEP.value)
  print(f"checkpoint step {result['step']}: {config.dataset.name} "
        f"{config.dataset.eval_split}, {int(result['count'])} images")
  print(f"Test accuracy: {100 * result['top1']:.2f}% (top-5 "
        f"{100 * result['top5']:.2f}%, loss {result['loss']:.4f})")


if __name__ == '__main__':
  app.run(main)
