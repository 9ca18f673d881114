"""``experiments.convert_official``: a converted workdir is evaluated and
fine-tuned by the experiment code (CIFAR read from ``tfds`` mock data)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import checkpointing
from experiments import convert_official
from experiments import experiment
from experiments import steps
from experiments import train
import test_convert_official as fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, 'tests', 'fixtures', 'official')
R20_NPZ = os.path.join(FIXTURES, 'resnet20_official.npz')


def _fixture_tensors():
  with np.load(R20_NPZ) as f:
    return {k: f[k] for k in f.files}


def _small_data(config):
  config.batch_size = 4
  config.eval_batch_size = 4
  config.dataset.max_eval_examples = 8
  config.dataset.num_workers = 1
  config.dataset.prefetch = 0
  return config


@pytest.fixture(scope='module')
def converted_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('convert') / 'resnet20_official')
  out = convert_official.convert_to_workdir(R20_NPZ, 'resnet20', workdir)
  assert (out['dataset'], out['num_classes'], out['kind']) == ('cifar10', 10,
                                                               'adder')
  return workdir


def test_workdir_holds_the_official_tensors(converted_workdir):
  with open(os.path.join(converted_workdir, 'config.json')) as f:
    stored = json.load(f)
  assert stored['model']['name'] == 'resnet20'
  assert stored['model']['kind'] == 'adder'
  assert stored['dataset']['name'] == 'cifar10'
  ckpt = checkpointing.Checkpointer(converted_workdir, primary=False)
  state, data = ckpt.restore_saved()
  ckpt.close()
  assert int(state['step']) == 0 and data['official_model'] == 'resnet20'
  sd = _fixture_tensors()
  params, stats = state['params'], state['batch_stats']
  np.testing.assert_array_equal(params['layer3_1']['conv2']['kernel'],
                                sd['layer3.1.conv2.adder'].transpose(2, 3, 1,
                                                                     0))
  np.testing.assert_array_equal(params['fc']['kernel'],
                                sd['fc.weight'][:, :, 0, 0].T)
  np.testing.assert_array_equal(stats['fc_bn']['mean'],
                                sd['bn2.running_mean'])


def test_evaluate_runs_on_the_converted_workdir(converted_workdir):
  config = _small_data(experiment.load_run_config(converted_workdir))
  with tfds.testing.mock_data(num_examples=12,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    result = train.evaluate_checkpoint(config, converted_workdir)
  assert result['step'] == 0 and result['count'] == 8
  assert np.isfinite(result['loss']) and 0.0 <= result['top1'] <= 1.0


def test_existing_workdir_is_not_overwritten(converted_workdir):
  before = os.listdir(converted_workdir)
  with pytest.raises(ValueError, match='holds a run already'):
    convert_official.convert_to_workdir(R20_NPZ, 'resnet20',
                                        converted_workdir)
  assert os.listdir(converted_workdir) == before


def test_config_for_the_class_count():
  assert convert_official.config_for('resnet20', 100).dataset.name == (
      'cifar100')
  assert convert_official.config_for('resnet20', 10, 'cnn').model.kind == (
      'cnn')
  with pytest.raises(ValueError, match=r'resnet20 with 7 classes; known'):
    convert_official.config_for('resnet20', 7)


def test_init_from_refuses_another_model(converted_workdir):
  """Fine-tuning a CIFAR-10 checkpoint as a CIFAR-100 model is refused."""
  config = convert_official.config_for('resnet20', 100)
  model = experiment.create_model(config.model, 100)
  abstract = jax.eval_shape(lambda x: model.init(
      jax.random.key(0), x, train=False), jnp.zeros((1, 32, 32, 3)))
  state = steps.TrainState(step=None, params=abstract['params'],
                           batch_stats=abstract['batch_stats'],
                           opt_state=None, rng=None)
  with pytest.raises(ValueError,
                     match=r"\['params'\]\['fc'\]\['kernel'\]: shape "
                     r'\(64, 10\), expected \(64, 100\)'):
    experiment.init_state_from_workdir(converted_workdir, state,
                                             tx=None)


@pytest.mark.slow
def test_fine_tuning_starts_from_the_converted_weights(converted_workdir,
                                                       tmp_path):
  """Two steps at learning rate 0 keep the converted parameters exactly."""
  config = _small_data(experiment.load_run_config(converted_workdir))
  config.num_epochs = 1
  config.steps_per_epoch = 2
  config.log_every_steps = 1
  config.progress_bar = False
  config.tensorboard = False
  config.optimizer.learning_rate = 0.0
  run = str(tmp_path / 'finetune')
  with tfds.testing.mock_data(num_examples=12,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    summary = train.train_and_evaluate(config, run,
                                       init_from=converted_workdir)
  assert summary['steps'] == 2
  ckpt = checkpointing.Checkpointer(run, primary=False)
  state, _ = ckpt.restore_saved()
  ckpt.close()
  assert int(state['step']) == 2
  sd = _fixture_tensors()
  np.testing.assert_array_equal(state['params']['layer2_0']['conv1'][
      'kernel'], sd['layer2.0.conv1.adder'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(state['params']['bn1']['scale'],
                                sd['bn1.weight'])


@pytest.mark.slow
def test_cli_converts(tmp_path):
  workdir = str(tmp_path / 'cli')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.convert_official', '--checkpoint',
       os.path.join(FIXTURES, 'resnet20_official_dataparallel.pth'),
       '--model', 'resnet20', '--reader', 'zip', '--workdir', workdir],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'resnet20 (adder, 10 classes, cifar10)' in proc.stdout
  assert os.path.exists(os.path.join(workdir, 'config.json'))
  # experiments.evaluate's CLI on it, CIFAR-10 from tfds mock data (256
  # examples: the config's training batch is read too).
  evaluate = (
      'import runpy, sys\n'
      'import tensorflow_datasets as tfds\n'
      f"sys.argv = ['evaluate', '--workdir', {workdir!r}, "
      "'--eval_batch_size', '64']\n"
      'with tfds.testing.mock_data(num_examples=256, '
      'policy=tfds.testing.MockPolicy.USE_CODE):\n'
      "  runpy.run_module('experiments.evaluate', run_name='__main__')\n")
  ev = subprocess.run([sys.executable, '-c', evaluate], cwd=REPO, env=env,
                      capture_output=True, text=True, timeout=300)
  assert ev.returncode == 0, ev.stderr[-3000:]
  assert 'checkpoint step 0: cifar10 test, 256 images' in ev.stdout
  assert 'Test accuracy:' in ev.stdout
  bad = subprocess.run(
      [sys.executable, '-m', 'experiments.convert_official', '--checkpoint',
       R20_NPZ, '--model', 'resnet50', '--workdir', str(tmp_path / 'bad')],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0
  assert 'ConversionError' in bad.stderr and 'missing key(s)' in bad.stderr


@pytest.mark.slow
def test_resnet50_workdir_has_the_official_head(tmp_path):
  """ResNet-50: the ImageNet config with the classifier bias, weights kept."""
  keys = fixtures._keys('resnet50')['keys']  # pylint: disable=protected-access
  sd = {k: fixtures._recipe(k, tuple(s))  # pylint: disable=protected-access
        for k, s in keys.items()}
  path = str(tmp_path / 'r50.npz')
  np.savez(path, **sd)
  workdir = str(tmp_path / 'r50')
  out = convert_official.convert_to_workdir(path, 'resnet50', workdir)
  assert (out['dataset'], out['num_classes']) == ('imagenet2012', 1000)
  config = experiment.load_run_config(workdir)
  assert config.model.overrides.classifier_bias
  ckpt = checkpointing.Checkpointer(workdir, primary=False)
  state, _ = ckpt.restore_saved()
  ckpt.close()
  np.testing.assert_array_equal(state['params']['fc']['bias'], sd['fc.bias'])
  np.testing.assert_array_equal(
      state['params']['layer4_2']['conv3']['kernel'],
      sd['layer4.2.conv3.adder'].transpose(2, 3, 1, 0))
