"""Smoke tests: a few training steps of every experiment config.

MNIST configs read tiny IDX files written here; CIFAR and ImageNet configs
read ``tfds.testing.mock_data``. Models are shrunk by ``runlocal``.
"""

import importlib
import os

import pytest
import tensorflow_datasets as tfds

from experiments import testing
from experiments import experiment
from experiments import train
from experiments.configs import default

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'experiments', 'configs')
CONFIGS = sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                 if f.endswith('.py') and f not in ('__init__.py',
                                                    'default.py'))
PAPER_EXPERIMENTS = {
    'lenet5_mnist', 'resnet20_cifar10', 'resnet32_cifar10',
    'vgg_small_cifar10', 'resnet20_cifar100', 'resnet32_cifar100',
    'vgg_small_cifar100', 'resnet18_imagenet', 'resnet50_imagenet'}


@pytest.fixture(scope='module')
def mnist_dir(tmp_path_factory):
  return testing.write_synthetic_mnist(str(tmp_path_factory.mktemp('mnist')))


def _smoke_config(name, kind, mnist_dir):
  config = importlib.import_module(f'experiments.configs.{name}').get_config(
      f'runlocal,{kind}')
  config.num_epochs = 1
  config.steps_per_epoch = 2
  config.batch_size = 4
  config.eval_batch_size = 4
  config.log_every_steps = 1
  config.progress_bar = False
  config.dataset.prefetch = 0
  config.dataset.num_workers = 1
  config.dataset.max_eval_examples = 6
  if config.dataset.name == 'mnist':
    config.dataset.data_dir = mnist_dir
  if config.dataset.name == 'imagenet2012':
    config.dataset.image_size = 32
    config.dataset.eval_resize = 36
  return config


def test_every_paper_experiment_has_a_config():
  assert PAPER_EXPERIMENTS <= set(CONFIGS)


@pytest.mark.parametrize('name', sorted(PAPER_EXPERIMENTS))
def test_config_recipe_and_kinds(name):
  module = importlib.import_module(f'experiments.configs.{name}')
  for kind in default.KINDS:
    config = module.get_config(kind)
    experiment.validate_config(config)
    assert config.model.kind == kind
  config = module.get_config()
  assert config.model.kind == 'adder'
  assert config.optimizer.momentum == 0.9
  assert config.batch_size == 256
  assert config.optimizer.learning_rate == 0.1
  if 'cifar' in name:
    assert config.num_epochs == 400
    assert config.optimizer.weight_decay == 5e-4
    assert config.dataset.augment
  elif 'imagenet' in name:
    assert config.num_epochs == 150
    assert config.optimizer.weight_decay == 1e-4
    assert (config.dataset.eval_resize, config.dataset.image_size) == (256,
                                                                       224)
  else:
    assert module.get_config('full').num_epochs == 50
  with pytest.raises(ValueError, match='unknown config argument'):
    module.get_config('adderr')


def _run(name, kind, mnist_dir, tmp_path):
  config = _smoke_config(name, kind, mnist_dir)
  with tfds.testing.mock_data(num_examples=12,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    summary = train.train_and_evaluate(config, str(tmp_path / name))
  assert summary['steps'] == 2
  assert summary['eval']['count'] == 6
  assert 0.0 <= summary['eval']['top1'] <= 1.0


@pytest.mark.parametrize('name', sorted(PAPER_EXPERIMENTS))
def test_smoke_every_config(name, mnist_dir, tmp_path):
  """Every config trains two steps (CNN kind: fast to compile)."""
  _run(name, 'cnn', mnist_dir, tmp_path)


@pytest.mark.parametrize('name,kind', [('lenet5_mnist', 'adder'),
                                       ('lenet5_mnist', 'bnn')])
def test_smoke_other_kinds(name, kind, mnist_dir, tmp_path):
  _run(name, kind, mnist_dir, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['adder', 'bnn'])
@pytest.mark.parametrize('name', sorted(PAPER_EXPERIMENTS - {'lenet5_mnist'}))
def test_smoke_every_config_every_kind(name, kind, mnist_dir, tmp_path):
  """The other kinds of every config (LeNet's: test_smoke_other_kinds)."""
  _run(name, kind, mnist_dir, tmp_path)
