r"""Converts an official AdderNet checkpoint into an evaluable workdir.

``python -m experiments.convert_official --checkpoint FILE --model resnet20
--workdir DIR`` reads the checkpoint (``.pth``, ``.npz`` or ``.safetensors``;
see :mod:`adderjax.official`), converts it strictly to the zoo model and
writes ``DIR`` as a run at step 0: ``config.json`` (the experiment config of
the checkpoint's dataset, read off its class count: 10 -> CIFAR-10, 100 ->
CIFAR-100 for ResNet-20; 1000 -> ImageNet for ResNet-50, whose config
``resnet50_imagenet_official`` gives the head its bias) and an Orbax
checkpoint with the converted parameters and BatchNorm statistics (fresh
optimizer state). Then::

  # the official preprocessing: CIFAR mean/std; ImageNet resize 256,
  # centre crop 224, ImageNet mean/std (experiments.data).
  python -m experiments.evaluate --workdir DIR
  # fine-tune: a new run that starts from DIR's weights (the config of the
  # same model: resnet20_cifar10/100.py, resnet50_imagenet_official.py).
  python -m experiments.main --config experiments/configs/resnet20_cifar10.py \
      --workdir workdirs/r20_finetune --init_from DIR --config.num_epochs=10

Examples::

  python -m experiments.convert_official \
      --checkpoint ResNet20-AdderNet.pth --model resnet20 \
      --workdir workdirs/resnet20_official
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from adderjax import official
from experiments import checkpointing
from experiments import cli
from experiments import errors
from experiments import experiment
from experiments import steps

# (model, num_classes) -> experiment config module of its dataset.
_CONFIGS = {
    ('resnet20', 10): 'resnet20_cifar10',
    ('resnet20', 100): 'resnet20_cifar100',
    ('resnet50', 1000): 'resnet50_imagenet_official',  # fc with a bias
}


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines this program's flags on ``flag_values``."""
  fv = flag_values
  flags.DEFINE_string('checkpoint', None,
                      'Official checkpoint: .pth, .npz or .safetensors.',
                      flag_values=fv)
  flags.DEFINE_enum('model', 'resnet20', ['resnet20', 'resnet50'],
                    'The official architecture.', flag_values=fv)
  flags.DEFINE_string('workdir', None, 'New run directory to write.',
                      flag_values=fv)
  flags.DEFINE_enum('kind', 'adder', ['adder', 'cnn'],
                    'AdderNet or its CNN twin.', flag_values=fv)
  flags.DEFINE_enum('reader', 'auto', ['auto', 'torch', 'zip'],
                    '.pth reader: PyTorch, the torch-free zip reader, or '
                    'auto (PyTorch when installed).', flag_values=fv)
  flags.DEFINE_integer('seed', 0, 'config.seed of the written run.',
                       flag_values=fv)
  flags.mark_flags_as_required(['checkpoint', 'workdir'], flag_values=fv)


def config_for(name: str, num_classes: int, kind: str = 'adder'):
  """The experiment config of an official model with ``num_classes``.

  Raises:
    experiments.errors.ConfigError: no experiment of that model has that
      many classes (a ``ValueError``).

  Examples:
    >>> config_for('resnet50', 1000).dataset.name
    'imagenet2012'
    >>> bool(config_for('resnet50', 1000).model.overrides.classifier_bias)
    True
  """
  module = _CONFIGS.get((name, num_classes))
  if module is None:
    known = ', '.join(f'{m} with {n} classes' for m, n in _CONFIGS)
    raise errors.ConfigError(f'no experiment config for {name} with '
                             f'{num_classes} classes; known: {known}.')
  return importlib.import_module(
      f'experiments.configs.{module}').get_config(kind)


def convert_to_workdir(checkpoint: str, name: str, workdir: str, *,
                       kind: str = 'adder', reader: str = 'auto',
                       seed: int = 0) -> dict[str, Any]:
  """Converts ``checkpoint`` and writes it as a step-0 run in ``workdir``.

  Args:
    checkpoint: the official checkpoint file.
    name: ``'resnet20'`` or ``'resnet50'``.
    workdir: a directory that holds no run yet.
    kind: ``'adder'`` or ``'cnn'``.
    reader: ``.pth`` reader (see :func:`adderjax.official.load_state_dict`).
    seed: ``config.seed`` of the run.

  Returns:
    ``{'workdir', 'model', 'kind', 'num_classes', 'dataset', 'config'}``.

  Raises:
    adderjax.official.ConversionError: the checkpoint does not fit.
    experiments.errors.UsageError: the file is not a readable checkpoint
      (empty, truncated, corrupt, an unknown suffix).
    experiments.errors.UserError: no experiment config for the class count
      (:class:`~experiments.errors.ConfigError`), or ``workdir`` holds a run
      already (:class:`~experiments.checkpointing.WorkdirMismatchError`;
      nothing is written then); both are ``ValueError`` s.
  """
  ckpt = checkpointing.Checkpointer(workdir, max_to_keep=1, async_save=False)
  if ckpt.stored_config() is not None or ckpt.latest_step() is not None:
    raise checkpointing.WorkdirMismatchError(
        f'{workdir} holds a run already; convert into a new --workdir '
        '(nothing was overwritten).')
  try:
    converted = official.load_official(checkpoint, name, kind=kind,
                                       reader=reader)
  except official.ConversionError:
    raise
  except (ValueError, OSError) as e:  # not a readable checkpoint file
    raise errors.UsageError(f'--checkpoint {checkpoint}: {e}') from e
  config = config_for(name, converted.num_classes, kind)
  config.seed = seed
  model = experiment.create_model(config.model, converted.num_classes)
  size = config.dataset.image_size
  example = jnp.zeros((1, size, size, 3))
  tx, _ = experiment.create_optimizer(config, model, example, steps_per_epoch=1)
  params = converted.variables['params']
  batch_stats = converted.variables['batch_stats']
  abstract = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), example)
  bad = experiment.tree_mismatches(abstract, converted.variables)
  if bad:  # the experiment config builds another model than the converter
    raise ValueError(f'the {config.model.name} of the experiment config does '
                     f'not take the converted variables: {bad[:8]}.')
  _, rng_key = jax.random.split(jax.random.key(seed, impl=steps.PRNG_IMPL))
  state = steps.TrainState(
      step=np.zeros((), np.int32), params=params, batch_stats=batch_stats,
      opt_state=experiment.numpy_tree(tx.init(params)),
      rng=np.asarray(jax.random.key_data(rng_key)))
  ckpt.write_config(config)
  ckpt.save(0, state, {'step': 0, 'epoch': 0.0,
                       'converted_from': os.path.abspath(checkpoint),
                       'official_model': name, 'kind': kind}, force=True)
  ckpt.close()
  return {'workdir': os.path.abspath(workdir), 'model': name, 'kind': kind,
          'num_classes': converted.num_classes,
          'dataset': config.dataset.name, 'config': config}


def main(flag_values: flags.FlagValues, args: list[str]) -> None:
  """Converts ``--checkpoint`` into ``--workdir``."""
  cli.no_arguments(args)
  fv = flag_values
  cli.check_workdir(fv.workdir)
  if not os.path.isfile(fv.checkpoint):
    raise errors.UsageError(f'--checkpoint {fv.checkpoint}: no such file.')
  try:
    out = convert_to_workdir(fv.checkpoint, fv.model, fv.workdir,
                             kind=fv.kind, reader=fv.reader, seed=fv.seed)
  except official.ConversionError as e:
    raise errors.UserError(f'{fv.checkpoint} does not convert to '
                           f'{fv.model} (ConversionError): {e}') from e
  print(f"converted {fv.checkpoint}: {out['model']} ({out['kind']}, "
        f"{out['num_classes']} classes, {out['dataset']}) -> "
        f"{out['workdir']}")
  print(f"evaluate: python -m experiments.evaluate --workdir "
        f"{out['workdir']}")


if __name__ == '__main__':
  cli.run(main, define_flags)
