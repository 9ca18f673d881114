"""The PKKD method (experiments.distillation) through the unchanged loop.

References: the teacher's step is a plain CNN step of the supervised method;
the student without distillation weights is a plain AdderNet step; the
logged distillation terms equal a float64 numpy evaluation of the kernels
from explicit patches of the layers' inputs (captured with Flax's own
interceptor, not the library's walker); a fixed teacher from a workdir stays
the CNN run's weights bit for bit.
"""

import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import adderjax
from experiments import errors
from experiments import experiment
from experiments import testing
from experiments import train
from experiments.benchmarks import models as models_bench
from experiments.configs import default
from experiments.configs import lenet5_mnist
from test_train import tiny_mnist_config
import adder_oracle


@pytest.fixture(scope='module')
def mnist_dir(tmp_path_factory):
  return testing.write_synthetic_mnist(
      str(tmp_path_factory.mktemp('mnist')), 64, 40, 0)


def pkkd_config(data_dir, **updates):
  return tiny_mnist_config(data_dir, kind='adder,pkkd', steps_per_epoch=2,
                           tensorboard=False, **updates)


def _state(exp):
  return jax.tree.map(jnp.asarray, exp.init_host_state())


def test_token_sets_the_method_on_every_config_and_refuses_two_methods():
  c = lenet5_mnist.get_config('pkkd')
  assert c.method == 'pkkd' and c.model.kind == 'adder'
  assert c.method_options.teacher == 'joint'
  for name in ('resnet20_cifar10', 'vgg_small_cifar100', 'resnet50_imagenet'):
    module = __import__(f'experiments.configs.{name}', fromlist=['x'])
    assert module.get_config('pkkd').method == 'pkkd'
  with pytest.raises(ValueError, match="'adv' sets method 'adversarial' "
                     "after 'pkkd'"):
    lenet5_mnist.get_config('pkkd,adv')


@pytest.mark.parametrize('key,value,needle', [
    ('teacher', 'bogus', "method_options.teacher 'bogus'"),
    ('teacher', 'workdir', "teacher_workdir must name a finished CNN run"),
    ('temperature', 0.0, 'method_options.temperature must be a finite '
     'number > 0, got 0.0'),
    ('feature_weight', -1.0, 'feature_weight must be a finite number >= 0'),
    ('kernel', 'yes', "method_options.kernel must be True or False, got "
     "'yes'"),
    ('layers', 7, "method_options.layers must be 'all'"),
])
def test_bad_options_are_named(mnist_dir, key, value, needle):
  c = pkkd_config(mnist_dir)
  # (A new dict: a ConfigDict keeps each field's type.)
  c.method_options = ml_collections.ConfigDict(
      {**c.method_options.to_dict(), key: value})
  with pytest.raises(errors.ConfigError, match=needle):
    experiment.validate_config(c)


def test_unknown_option_and_options_of_another_method_are_named(mnist_dir):
  c = pkkd_config(mnist_dir)
  with c.method_options.unlocked():
    c.method_options.sigma = 1.0
  with pytest.raises(errors.ConfigError,
                     match=r"method_options \['sigma'\] are not options of "
                     "method 'pkkd'"):
    experiment.validate_config(c)
  plain = tiny_mnist_config(mnist_dir, kind='adder')
  plain.method_options = ml_collections.ConfigDict({'teacher': 'joint'})
  with pytest.raises(errors.ConfigError, match="its options: none"):
    experiment.validate_config(plain)


def test_layers_out_of_range_and_a_cnn_student_are_named(mnist_dir):
  c = pkkd_config(mnist_dir)
  c.method_options.layers = '0,5'
  exp = experiment.Experiment.from_config(c)
  with pytest.raises(errors.ConfigError, match=r"layers '0,5'.*0\.\.2"):
    exp.train_step_fn()
  c = pkkd_config(mnist_dir)
  c.model.kind = 'cnn'
  with pytest.raises(errors.ConfigError, match="model has none"):
    experiment.Experiment.from_config(c).init_host_state()


def test_teacher_step_is_a_cnn_step_and_student_a_plain_adder_step(
    mnist_dir):
  c = pkkd_config(mnist_dir)
  c.method_options.feature_weight = 0.0
  c.method_options.kd_weight = 0.0
  exp = experiment.Experiment.from_config(c)
  state = _state(exp)
  batch = exp.datasets.train.batch(0)
  new, _ = jax.jit(exp.train_step_fn())(state, batch)

  # The student: the supervised method's step from the same state.
  plain = experiment.Experiment.from_config(
      tiny_mnist_config(mnist_dir, kind='adder', steps_per_epoch=2,
                        tensorboard=False))
  p_state = _state(plain)
  for a, b in zip(jax.tree.leaves(p_state.params),
                  jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)  # the same initialisation
  p_new, _ = jax.jit(plain.train_step_fn())(p_state, batch)
  for a, b in zip(jax.tree.leaves((p_new.params, p_new.batch_stats)),
                  jax.tree.leaves((new.params, new.batch_stats))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

  # The teacher: the supervised CNN's step from the teacher's state.
  cnn = experiment.Experiment.from_config(
      tiny_mnist_config(mnist_dir, kind='cnn', steps_per_epoch=2,
                        tensorboard=False))
  c_state = _state(cnn).replace(
      params=state.teacher_params, batch_stats=state.teacher_batch_stats,
      opt_state=cnn.tx.init(state.teacher_params))
  c_new, _ = jax.jit(cnn.train_step_fn())(c_state, batch)
  for a, b in zip(jax.tree.leaves((c_new.params, c_new.batch_stats)),
                  jax.tree.leaves((new.teacher_params,
                                   new.teacher_batch_stats))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _capture(model, variables, x):
  """Inputs and outputs of conv2, fc1, fc2 and the logits (train mode)."""
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    name = context.module.name
    if context.method_name == '__call__' and name in ('conv2', 'fc1', 'fc2'):
      seen[name] = (np.asarray(args[0], np.float64),
                    np.asarray(context.module.variables['params']['kernel'],
                               np.float64))
    return out

  with nn.intercept_methods(interceptor):
    logits, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
  return seen, np.asarray(logits, np.float64)


def _distances(x, w):
  """float64 l1 and squared l2 distances, explicit patches (VALID conv or
  dense)."""
  if w.ndim == 2:
    d = x[:, :, None] - w[None]
    return np.abs(d).sum(1), np.square(d).sum(1)
  n, out_c = x.shape[0], w.shape[-1]
  l1, l2 = [], []
  for o, idx, shape in adder_oracle._windows(x.shape, w.shape[:2], (1, 1),
                                             (1, 1)):
    p = x[(slice(None),) + idx + (slice(None),)].reshape(n, -1, 1)
    d = p - w.reshape(1, -1, out_c)
    l1.append(np.abs(d).sum(1))
    l2.append(np.square(d).sum(1))
  shape = (n,) + tuple(shape) + (out_c,)
  return (np.stack(l1, 1).reshape(shape), np.stack(l2, 1).reshape(shape))


@pytest.mark.parametrize('kernel', [True, False])
def test_logged_distillation_terms_match_numpy_from_explicit_patches(
    mnist_dir, kernel):
  temp = 3.0
  c = pkkd_config(mnist_dir)
  c.method_options.temperature = temp
  c.method_options.kernel = kernel
  exp = experiment.Experiment.from_config(c)
  state = _state(exp)
  batch = exp.datasets.train.batch(0)
  _, metrics = jax.jit(exp.train_step_fn())(state, batch)
  count = float(metrics['count'])

  x = ((batch['image'].astype(np.float32) / 255 - np.float32(exp.mean)) /
       np.float32(exp.std))
  s_seen, s_logits = _capture(
      exp.model, {'params': state.params, 'batch_stats': state.batch_stats},
      x)
  teacher = adderjax.models.create_model(
      'lenet5_bn', kind='cnn', num_classes=10)
  t_seen, t_logits = _capture(
      teacher, {'params': state.teacher_params,
                'batch_stats': state.teacher_batch_stats}, x)
  feature = 0.0
  for name in ('conv2', 'fc1', 'fc2'):
    l1, _ = _distances(*s_seen[name])
    _, l2 = _distances(*t_seen[name])
    if kernel:
      k_a = np.exp(-l1 / l1.mean())      # alignment: identity at init
      k_c = np.exp(-l2 / l2.mean())
    else:  # the raw outputs -l1 and x.w, each over its mean magnitude
      x, w = t_seen[name]
      if w.ndim == 2:
        dot = x @ w
      else:  # x.w per patch: (||x_p||^2 + ||w||^2 - ||x_p - w||^2) / 2
        _, x2 = _distances(x, np.zeros_like(w))
        dot = (x2 + np.sum(w ** 2, axis=(0, 1, 2)) - l2) / 2
      k_a = -l1 / l1.mean()
      k_c = dot / np.abs(dot).mean()
    feature += np.mean((k_a - k_c) ** 2)
  np.testing.assert_allclose(float(metrics['loss/pkkd_feature']) / count,
                             feature, rtol=2e-3)

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  lp, lq = log_softmax(t_logits / temp), log_softmax(s_logits / temp)
  kd = temp ** 2 * np.mean(np.sum(np.exp(lp) * (lp - lq), -1))
  np.testing.assert_allclose(float(metrics['loss/pkkd_kd']) / count, kd,
                             rtol=1e-3)


def _leaves(workdir):
  with experiment.checkpointing.Checkpointer(workdir, primary=False) as ck:
    saved, _ = ck.restore_saved()
  return saved


@pytest.mark.slow  # three tiny runs: about 2 minutes on 2 busy cores
def test_joint_run_resumes_bit_identically_and_evaluates_the_student(
    mnist_dir, tmp_path):
  config = pkkd_config(mnist_dir)
  full = str(tmp_path / 'full')
  summary = train.train_and_evaluate(config, full)
  assert summary['steps'] == 4
  assert set(summary['teacher_eval']) == {'loss', 'top1', 'top5'}
  split = str(tmp_path / 'split')
  first = config.copy_and_resolve_references()
  first.num_train_steps = 2
  train.train_and_evaluate(first, split)
  resumed = train.train_and_evaluate(config, split)
  assert resumed['resumed_from'] == 2
  a, b = _leaves(full), _leaves(split)
  assert set(a) >= {'teacher_params', 'teacher_opt_state', 'align_params'}
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  rows = [json.loads(l) for l in open(os.path.join(full, 'metrics.jsonl'))]
  assert any('train/teacher/top1' in r for r in rows)
  assert any('eval/teacher/top1' in r for r in rows)
  # The student evaluates through experiments.evaluate like any run.
  stored = experiment.load_run_config(full)
  result = train.evaluate_checkpoint(stored, full)
  assert result['top1'] == summary['eval']['top1']
  assert result['teacher/top1'] == summary['teacher_eval']['top1']


@pytest.mark.slow  # two tiny runs
def test_fixed_teacher_from_a_cnn_workdir_stays_fixed(mnist_dir, tmp_path):
  cnn_dir = str(tmp_path / 'cnn')
  cnn_summary = train.train_and_evaluate(
      tiny_mnist_config(mnist_dir, kind='cnn', steps_per_epoch=2,
                        tensorboard=False), cnn_dir)
  cnn = _leaves(cnn_dir)
  c = pkkd_config(mnist_dir)
  c.method_options.teacher = 'workdir'
  c.method_options.teacher_workdir = cnn_dir
  summary = train.train_and_evaluate(c, str(tmp_path / 'student'))
  saved = _leaves(str(tmp_path / 'student'))
  for x, y in zip(jax.tree.leaves((cnn['params'], cnn['batch_stats'])),
                  jax.tree.leaves((saved['teacher_params'],
                                   saved['teacher_batch_stats']))):
    np.testing.assert_array_equal(x, y)
  assert summary['teacher_eval']['top1'] == cnn_summary['eval']['top1']

  # An adder run is no teacher; an empty directory holds no run.
  c.method_options.teacher_workdir = str(tmp_path / 'student')
  with pytest.raises(errors.ConfigError, match="holds a 'adder' run"):
    experiment.Experiment.from_config(c).init_host_state()
  c.method_options.teacher_workdir = str(tmp_path / 'nothing')
  with pytest.raises(errors.UserError, match='holds no finished run'):
    experiment.Experiment.from_config(c).init_host_state()


def test_models_benchmark_times_the_joint_step_against_the_addnn_step():
  from_suite = models_bench.run_suite(
      [models_bench.ModelCase('lenet5_bn', 8)], repeats=1, verbose=False,
      pkkd=True)
  (result,) = from_suite
  assert set(result.cands) == {'cnn', 'adder', models_bench.PKKD}
  assert all(not c.error and c.times for c in result.cands.values())
  # The joint step holds two networks: more memory than the student alone.
  assert (result.cands[models_bench.PKKD].peak_bytes >
          result.cands['adder'].peak_bytes)
  text = models_bench.report_pkkd(from_suite)
  assert 'lenet5_bn b8 float32' in text and 'PKKD/AddNN' in text


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MULTI = textwrap.dedent('''
    import json, os, sys
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
    import jax
    from experiments import experiment, testing
    from experiments.configs import lenet5_mnist

    data_dir = testing.write_synthetic_mnist(sys.argv[1], 64, 16)
    out = {}
    for name in ('one', 'jit', 'pmap'):
      c = lenet5_mnist.get_config('runlocal,adder,pkkd')
      c.dataset.data_dir = data_dir
      c.batch_size, c.eval_batch_size, c.dataset.prefetch = 16, 16, 1
      c.parallelism = 'pmap' if name == 'pmap' else 'jit'
      exp = experiment.Experiment.from_config(
          c, devices=jax.devices()[:1] if name == 'one' else None)
      state = exp.runner.put_state(exp.init_host_state())
      rows = []
      for s in range(2):
        state, m = exp.train_step(state, exp.put_batch(
            exp.datasets.train.batch(s)))
        m = exp.runner.get_metrics(m)
        rows.append({k: float(v) / float(m['count']) for k, v in m.items()
                     if k != 'count'})
      out[name] = rows
    print('RESULT' + json.dumps(out))
''')


@pytest.mark.slow
def test_jit_mesh_and_pmap_train_the_pair(tmp_path):
  script = tmp_path / 'run.py'
  script.write_text(MULTI)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, str(script), str(tmp_path / 'm')],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT')][-1]
  out = json.loads(line[len('RESULT'):])
  # The jit mesh computes the one-device step on a split batch: the same
  # student and teacher figures, the distillation terms included.
  for one, jit in zip(out['one'], out['jit']):
    assert set(one) >= {'loss', 'loss/pkkd_feature', 'loss/pkkd_kd',
                        'teacher/top1'}
    for key in one:
      np.testing.assert_allclose(jit[key], one[key], rtol=2e-4, atol=1e-6)
  # pmap: BatchNorm statistics are averaged over the devices, but the
  # kernels' bandwidths are each device's batch mean: close, not equal.
  for one, pm in zip(out['one'], out['pmap']):
    for key in ('loss', 'teacher/loss', 'loss/pkkd_kd'):
      np.testing.assert_allclose(pm[key], one[key], rtol=0.05)
    assert np.isfinite(pm['loss/pkkd_feature'])
