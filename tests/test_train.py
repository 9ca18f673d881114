"""Tests of the training loop (experiments.train) on one device.

Tiny MNIST-format IDX directories are written by the tests; CIFAR/ImageNet
use ``tfds.testing.mock_data``.
"""

import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import adderjax

from experiments import checkpointing
from experiments import data
from experiments import idx
from experiments import testing
from experiments import errors
from experiments import experiment
from experiments import losses
from experiments import steps
from experiments import train
from experiments.configs import lenet5_mnist
from experiments.configs import resnet20_cifar10

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_mnist(path, n_train=96, n_test=40, seed=0):
  return testing.write_synthetic_mnist(str(path), n_train, n_test, seed)


def tiny_mnist_config(data_dir, kind='cnn', **updates):
  c = lenet5_mnist.get_config(f'runlocal,{kind}')
  c.dataset.data_dir = data_dir
  c.batch_size = 16
  c.eval_batch_size = 20
  c.steps_per_epoch = 3
  c.num_epochs = 2
  c.log_every_steps = 2
  c.progress_bar = False
  c.dataset.prefetch = 1
  c.dataset.max_eval_examples = -1
  for key, value in updates.items():
    section, _, leaf = key.rpartition('.')
    (c[section] if section else c)[leaf] = value
  return c


@pytest.fixture(scope='module')
def mnist_dir(tmp_path_factory):
  return write_mnist(tmp_path_factory.mktemp('mnist'))


def _restore_params(workdir):
  """Final parameters of a run, read back from its last checkpoint."""
  config = experiment.load_run_config(workdir)
  ckpt = checkpointing.Checkpointer(workdir, primary=False)
  step = ckpt.latest_step()
  state, _ = ckpt.restore_saved(step)
  ckpt.close()
  return step, state


def _tree_bytes(tree):
  leaves = jax.tree.leaves(tree)
  return hashlib.sha256(b''.join(np.asarray(x).tobytes()
                                 for x in leaves)).hexdigest()


# --- the step against the paper's update rule -------------------------------


@pytest.mark.parametrize('remat', ['none', 'layer_outputs'])
def test_first_step_matches_the_paper_update(mnist_dir, remat):
  """One step = SGD on the mean loss with eta*sqrt(k)*g/||g|| on adder kernels.

  With and without the activation recompute of the train step's loss.
  """
  from adderjax import models
  config = tiny_mnist_config(mnist_dir, kind='adder')
  ds = data.build_datasets(config.dataset, seed=0, global_batch_size=16,
                           eval_batch_size=20)
  model = experiment.create_model(config.model, 10)
  example = jnp.zeros((1, 28, 28, 1))
  tx, schedule = experiment.create_optimizer(config, model, example, 3)
  state = steps.init_host_state(model, tx, 0, (28, 28, 1))
  batch = ds.train.batch(0)
  step = jax.jit(steps.make_train_step(model.apply, tx, ds.mean, ds.std,
                                       remat=remat))
  new_state, metrics = step(jax.tree.map(jnp.asarray, state), batch)

  # Independent reference: gradients of the mean cross-entropy by jax.grad
  # of a hand-written loss, and the update written from the paper.
  # The synthetic files are not MNIST's: normalised with the training set's
  # own pixel mean and std (numpy oracle, float64).
  pixels = data.load_mnist_split(mnist_dir, 'train').images / 255.0
  assert ds.name == 'idx' and not ds.verified
  np.testing.assert_allclose(ds.mean, [pixels.mean()], rtol=1e-12)
  np.testing.assert_allclose(ds.std, [pixels.std()], rtol=1e-9)
  x = (batch['image'].astype(np.float32) / 255 - pixels.mean()) / pixels.std()

  def loss(params):
    logits, _ = model.apply({'params': params,
                             'batch_stats': state.batch_stats}, x,
                            train=True, mutable=['batch_stats'])
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(logp[jnp.arange(16), batch['label']])

  grads = jax.jit(jax.grad(loss))(state.params)
  lr, wd, eta = 0.1, 5e-4, 0.2
  adder_layers = {'conv2', 'fc1', 'fc2'}
  for layer, leaves in state.params.items():
    for name, w0 in leaves.items():
      g = np.asarray(grads[layer][name], np.float64)
      if layer in adder_layers and name == 'kernel':
        g = eta * np.sqrt(g.size) * g / max(np.linalg.norm(g), 1e-12)
      expected = -lr * (g + wd * w0)
      actual = np.asarray(new_state.params[layer][name], np.float64) - w0
      # float32 sums in another order: compare at the update's scale.
      np.testing.assert_allclose(actual, expected,
                                 atol=2e-3 * np.abs(expected).max() + 1e-7,
                                 err_msg=f'{layer}/{name}')
  assert isinstance(model, models.LeNet5BN)
  assert float(schedule(0)) == pytest.approx(0.1)
  assert int(new_state.step) == 1
  assert float(metrics['count']) == 16
  np.testing.assert_allclose(float(metrics['loss']) / 16,
                             float(loss(state.params)), rtol=1e-5)


def test_classification_metrics_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(50, 12)).astype(np.float32)
  labels = rng.integers(0, 12, size=50)
  mask = rng.random(50) < 0.7
  m = losses.classification_metrics(jnp.asarray(logits), jnp.asarray(labels),
                                   jnp.asarray(mask))
  order = np.argsort(-logits, axis=1)
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  ce = -logp[np.arange(50), labels]
  np.testing.assert_allclose(float(m['loss']), ce[mask].sum(), rtol=1e-5)
  assert float(m['top1']) == (order[:, 0] == labels)[mask].sum()
  assert float(m['top5']) == (order[:, :5] == labels[:, None]).any(1)[
      mask].sum()
  assert float(m['count']) == mask.sum()


# --- the whole loop ----------------------------------------------------------


def test_train_and_evaluate_writes_everything(mnist_dir, tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  config = tiny_mnist_config(mnist_dir, kind='adder')
  summary = train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out.strip().splitlines()
  assert out[-1].startswith('Final test accuracy: ')
  assert f"{100 * summary['eval']['top1']:.2f}%" in out[-1]
  assert summary['steps'] == 6 and summary['eval']['count'] == 40
  records = [json.loads(l) for l in open(os.path.join(workdir,
                                                      'metrics.jsonl'))]
  train_records = [r for r in records if 'train/loss' in r]
  eval_records = [r for r in records if 'eval/top1' in r]
  assert [r['step'] for r in train_records] == [2, 4, 6]
  assert [r['step'] for r in eval_records] == [3, 6]
  for r in train_records:
    assert {'train/top1', 'train/top5', 'train/learning_rate',
            'train/images_per_second'} <= set(r)
  # lr: cosine per epoch over 2 epochs: 0.1 in epoch 0, 0.05 in epoch 1.
  assert [round(r['train/learning_rate'], 6) for r in train_records] == [
      0.1, 0.05, 0.05]
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  assert json.load(open(os.path.join(workdir, 'config.json')))['model'][
      'kind'] == 'adder'
  # Evaluating the checkpoint reproduces the final evaluation.
  result = train.evaluate_checkpoint(experiment.load_run_config(workdir),
                                     workdir)
  assert result['step'] == 6
  assert result['top1'] == pytest.approx(summary['eval']['top1'])
  assert result['loss'] == pytest.approx(summary['eval']['loss'], rel=1e-5)


def test_learns_the_tiny_task(mnist_dir, tmp_path):
  config = tiny_mnist_config(mnist_dir, kind='cnn', num_epochs=6,
                             steps_per_epoch=6)
  config.optimizer.learning_rate = 0.05
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['eval']['top1'] > 0.5  # chance is 0.1


def test_resume_is_bit_identical(mnist_dir, tmp_path):
  config = tiny_mnist_config(mnist_dir)
  full = str(tmp_path / 'full')
  train.train_and_evaluate(config, full)
  parts = str(tmp_path / 'parts')
  config.num_train_steps = 4     # stops after step 4 (mid-epoch 2)
  train.train_and_evaluate(config, parts)
  config.num_train_steps = -1
  summary = train.train_and_evaluate(config, parts)
  assert summary['resumed_from'] == 4
  step_a, state_a = _restore_params(full)
  step_b, state_b = _restore_params(parts)
  assert step_a == step_b == 6
  assert _tree_bytes(state_a) == _tree_bytes(state_b)
  # Metrics of the steps after the resume point appear once.
  steps = [json.loads(l)['step'] for l in open(os.path.join(parts,
                                                            'metrics.jsonl'))
           if 'train/loss' in l]
  assert steps == [2, 4, 6]


def test_pmap_loop_matches_jit_loop(mnist_dir, tmp_path):
  """The whole loop (placement, checkpoints, eval) under pmap."""
  runs = {}
  for parallelism in ('jit', 'pmap'):
    config = tiny_mnist_config(mnist_dir, parallelism=parallelism)
    workdir = str(tmp_path / parallelism)
    summary = train.train_and_evaluate(config, workdir)
    runs[parallelism] = (summary, _restore_params(workdir))
  (s_jit, (step_jit, state_jit)), (s_pmap, (step_pmap, state_pmap)) = (
      runs['jit'], runs['pmap'])
  assert step_jit == step_pmap == 6
  for a, b in zip(jax.tree.leaves(state_jit), jax.tree.leaves(state_pmap)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-6)
  assert s_pmap['eval']['top1'] == s_jit['eval']['top1']
  # A pmap run's checkpoint restores under jit (parallelism may change).
  again = train.evaluate_checkpoint(tiny_mnist_config(mnist_dir),
                                    str(tmp_path / 'pmap'))
  assert again['step'] == 6
  assert again['top1'] == s_pmap['eval']['top1']
  assert again['loss'] == pytest.approx(s_pmap['eval']['loss'], rel=1e-5)


def test_bn_recalibration_uses_exact_batch_statistics(mnist_dir, tmp_path):
  import flax.linen as nn
  config = tiny_mnist_config(mnist_dir, kind='adder',
                             bn_recalibration_batches=2)
  exp = experiment.Experiment.from_config(config)
  ds, model = exp.datasets, exp.model
  state = jax.tree.map(jnp.asarray, exp.init_host_state())
  new = exp.recalibrate_batch_stats(state, 2)
  # Oracle: the conv1 outputs (BatchNorm bn1's inputs) of the two batches,
  # captured, and their per-batch mean / biased variance averaged.
  means, variances = [], []
  for i in range(2):
    x = steps.normalize(ds.train.batch(i)['image'], ds.mean, ds.std)
    _, inter = model.apply({'params': state.params,
                            'batch_stats': state.batch_stats}, x,
                           train=True, mutable=['batch_stats',
                                                'intermediates'],
                           capture_intermediates=lambda m, _: m.name ==
                           'conv1')
    y = np.asarray(inter['intermediates']['conv1']['__call__'][0],
                   np.float64)
    means.append(y.mean((0, 1, 2)))
    variances.append(y.var((0, 1, 2)))
  np.testing.assert_allclose(new.batch_stats['bn1']['mean'],
                             np.mean(means, 0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(new.batch_stats['bn1']['var'],
                             np.mean(variances, 0), rtol=1e-3, atol=1e-5)
  del nn


# --- bad input ---------------------------------------------------------------


def _snapshot(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      p = os.path.join(root, f)
      out[os.path.relpath(p, directory)] = hashlib.sha256(
          open(p, 'rb').read()).hexdigest()
  return out


def test_workdir_of_another_model_is_refused(mnist_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  config = tiny_mnist_config(mnist_dir, num_epochs=1)
  train.train_and_evaluate(config, workdir)
  before = _snapshot(workdir)
  other = tiny_mnist_config(mnist_dir, kind='bnn', num_epochs=1)
  with pytest.raises(checkpointing.WorkdirMismatchError,
                     match="another model: model.kind: stored 'cnn', now "
                     "'bnn'"):
    train.train_and_evaluate(other, workdir)
  changed = tiny_mnist_config(mnist_dir, num_epochs=1)
  changed.optimizer.learning_rate = 0.5
  with pytest.raises(checkpointing.WorkdirMismatchError,
                     match='optimizer.learning_rate'):
    train.train_and_evaluate(changed, workdir)
  assert _snapshot(workdir) == before


def test_unknown_and_bad_config_values(mnist_dir, tmp_path):
  config = tiny_mnist_config(mnist_dir)
  with config.unlocked():
    config.optimizer.lerning_rate = 0.1
  with pytest.raises(ValueError, match='lerning_rate'):
    train.train_and_evaluate(config, str(tmp_path / 'a'))
  config = tiny_mnist_config(mnist_dir)
  config.model.kind = 'quantum'
  with pytest.raises(ValueError, match="'quantum'"):
    train.train_and_evaluate(config, str(tmp_path / 'b'))
  config = tiny_mnist_config(mnist_dir)
  config.model.overrides = ml_collections.ConfigDict({'depth': 3})
  with pytest.raises(ValueError, match='depth'):
    train.train_and_evaluate(config, str(tmp_path / 'c'))
  config = tiny_mnist_config(mnist_dir)
  config.remat = 'everything'
  with pytest.raises(ValueError, match="remat 'everything'"):
    train.train_and_evaluate(config, str(tmp_path / 'd'))
  assert not os.path.exists(tmp_path / 'a')


def test_remat_auto_by_platform():
  assert steps.resolve_remat('auto', 'cpu') == 'none'
  assert steps.resolve_remat('auto', 'tpu') == 'layer_outputs'
  assert steps.resolve_remat('auto', 'gpu') == 'layer_outputs'
  assert steps.resolve_remat('none', 'tpu') == 'none'
  assert steps.resolve_remat('layer_outputs', 'cpu') == 'layer_outputs'
  with pytest.raises(ValueError, match="remat 'some'"):
    steps.resolve_remat('some', 'cpu')
  with pytest.raises(ValueError, match="remat 'auto'"):
    steps.make_train_step(lambda *a, **k: None, None, 0.0, 1.0, remat='auto')


def test_remat_blocks_auto_per_model_on_tpu():
  # remat_blocks='auto' with remat='auto' on TPU is the model's entry of
  # TPU_AUTO_REMAT (ResNet-20's AddNN: the blocks of stages 1 and 2); another
  # remat, platform or kind, or an unlisted model give None (as configured);
  # the words and stage numbers say it outright.
  def config(name='resnet20', kind='adder', remat='auto', blocks='auto'):
    return ml_collections.ConfigDict(dict(
        remat=remat, remat_blocks=blocks, model=dict(name=name, kind=kind)))
  assert steps.resolve_remat_blocks(config(), 'tpu') == (1, 2)
  assert steps.resolve_remat('auto', 'tpu', ('resnet20', 'adder')) == (
      'layer_outputs')
  assert steps.resolve_remat_blocks(config(), 'cpu') is None
  assert steps.resolve_remat_blocks(config(), 'gpu') is None
  assert steps.resolve_remat_blocks(config(remat='none'), 'tpu') is None
  assert steps.resolve_remat_blocks(config(kind='cnn'), 'tpu') is None
  assert steps.resolve_remat_blocks(config('resnet50'), 'tpu') is None
  assert steps.resolve_remat_blocks(config(blocks='none'), 'tpu') is False
  assert steps.resolve_remat_blocks(config(blocks='all'), 'cpu') is True
  assert steps.resolve_remat_blocks(config(blocks=' 3, 1'), 'cpu') == (3, 1)
  for bad in ('0', 'some', '1,,2', '', 'true'):
    with pytest.raises(ValueError, match=f'remat_blocks {bad!r}'):
      steps.parse_remat_blocks(bad)
  for (name, kind), (policy, blocks) in steps.TPU_AUTO_REMAT.items():
    assert policy in steps.REMAT_POLICIES, (name, policy)
    # The entry builds: the zoo accepts its remat_blocks for that model.
    adderjax.create_model(name, kind=kind, num_classes=10,
                          remat_blocks=blocks)


def test_remat_blocks_config_errors(mnist_dir, tmp_path):
  # LeNet-5 has no residual stages; a stage past the model's last is refused
  # by the model; both name the value.
  config = tiny_mnist_config(mnist_dir)
  config.remat_blocks = '1'
  with pytest.raises(errors.ConfigError, match="remat_blocks '1'.*lenet5"):
    experiment.Experiment.from_config(config, data=False)
  config = resnet20_cifar10.get_config('runlocal')
  config.remat_blocks = '1,4'
  with pytest.raises(errors.ConfigError, match=r'\[4\] out of range'):
    experiment.Experiment.from_config(config, data=False)
  config.remat_blocks = '2'  # builds, and recomputes stage 2 on any platform
  exp = experiment.Experiment.from_config(config, data=False)
  assert exp.model.remat_blocks == (2,)


def test_corrupt_data_file_is_named(mnist_dir, tmp_path):
  bad = tmp_path / 'bad'
  write_mnist(bad)
  path = bad / 'train-images-idx3-ubyte'
  path.write_bytes(path.read_bytes()[:-100])
  workdir = tmp_path / 'run'
  with pytest.raises(idx.IdxFormatError, match='train-images-idx3-ubyte.*'
                     'truncated'):
    train.train_and_evaluate(tiny_mnist_config(str(bad)), str(workdir))
  assert not workdir.exists() or not os.listdir(workdir)
  with pytest.raises(data.DataError, match='fetch_data mnist'):
    train.train_and_evaluate(tiny_mnist_config(str(tmp_path / 'none')),
                             str(workdir))


def test_cli_rejects_unknown_key_and_prints_accuracy(mnist_dir, tmp_path):
  base = [sys.executable, '-m', 'experiments.main', '--config',
          'experiments/configs/lenet5_mnist.py:runlocal,cnn',
          '--workdir', str(tmp_path / 'run')]
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  bad = subprocess.run(base + ['--config.optimizer.lr=0.1'], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0
  assert bad.returncode == 2
  assert "unknown config key 'lr' in --config.optimizer.lr" in bad.stderr
  good = subprocess.run(
      base + [f'--config.dataset.data_dir={mnist_dir}',
              '--config.batch_size=16', '--config.eval_batch_size=20',
              '--config.steps_per_epoch=2', '--config.num_epochs=1',
              '--config.progress_bar=False'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert good.returncode == 0, good.stderr[-3000:]
  assert good.stdout.strip().splitlines()[-1].startswith(
      'Final test accuracy:')
  ev = subprocess.run([sys.executable, '-m', 'experiments.evaluate',
                       '--workdir', str(tmp_path / 'run')], cwd=REPO,
                      env=env, capture_output=True, text=True, timeout=300)
  assert ev.returncode == 0, ev.stderr[-3000:]
  assert 'Test accuracy:' in ev.stdout


def test_load_run_config_roundtrip(mnist_dir, tmp_path):
  config = tiny_mnist_config(mnist_dir)
  config.model.overrides = ml_collections.ConfigDict({'pool': 'avg'})
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  ckpt.write_config(config)
  loaded = experiment.load_run_config(str(tmp_path))
  checkpointing.compare_configs(checkpointing.config_to_dict(config),
                                checkpointing.config_to_dict(loaded))
  assert loaded.model.overrides.pool == 'avg'
