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

from absl import flags

from experiments import cli
from experiments import experiment
from experiments import train


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines this program's flags on ``flag_values``."""
  flags.DEFINE_string('workdir', None, 'Run directory.',
                      flag_values=flag_values)
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: last).',
                       flag_values=flag_values)
  flags.DEFINE_string('data_dir', None,
                      'Override dataset.data_dir (MNIST files).',
                      flag_values=flag_values)
  flags.DEFINE_string('tfds_data_dir', None, 'Override dataset.tfds_data_dir.',
                      flag_values=flag_values)
  flags.DEFINE_string('split', None, 'Override dataset.eval_split.',
                      flag_values=flag_values)
  flags.DEFINE_integer('eval_batch_size', None, 'Override eval_batch_size.',
                       flag_values=flag_values)
  flags.DEFINE_integer('bn_recalibration_batches', None,
                       'Recompute BN statistics from N batches.',
                       flag_values=flag_values)
  flags.DEFINE_bool('trust_workdir_code', False,
                    'Allow the workdir\'s config.json to name a model '
                    '"module:factory" (imports and runs that module).',
                    flag_values=flag_values)
  flags.mark_flag_as_required('workdir', flag_values=flag_values)


def main(flag_values: flags.FlagValues, args: list[str]) -> None:
  """Evaluates the checkpoint of ``--workdir`` and prints the result."""
  cli.no_arguments(args)
  config = experiment.load_run_config(
      flag_values.workdir, trust_code=flag_values.trust_workdir_code)
  for flag, key in (('data_dir', 'dataset.data_dir'),
                    ('tfds_data_dir', 'dataset.tfds_data_dir'),
                    ('split', 'dataset.eval_split'),
                    ('eval_batch_size', 'eval_batch_size'),
                    ('bn_recalibration_batches', 'bn_recalibration_batches')):
    value = flag_values[flag].value
    if value is not None:
      section, _, leaf = key.rpartition('.')
      (config[section] if section else config)[leaf] = value
  result = train.evaluate_checkpoint(config, flag_values.workdir,
                                     flag_values.step)
  print(f"checkpoint step {result['step']}: {config.dataset.name} "
        f"{config.dataset.eval_split}, {int(result['count'])} images")
  print(f"Test accuracy: {100 * result['top1']:.2f}% (top-5 "
        f"{100 * result['top5']:.2f}%, loss {result['loss']:.4f})")


if __name__ == '__main__':
  cli.run(main, define_flags)
