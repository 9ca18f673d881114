"""Adversarial training (experiments.adversarial) and the robustness entry
point (experiments.robustness) on the tiny synthetic MNIST."""

import json
import os
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import adversarial
from experiments import cli
from experiments import errors
from experiments import experiment
from experiments import methods
from experiments import robustness
from experiments import steps
from experiments import testing
from experiments import train
from experiments.configs import default
from experiments.configs import lenet5_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def adv_config(data_dir, kind='cnn', arg='adv', **updates):
  c = lenet5_mnist.get_config(f'runlocal,{kind},{arg}' if arg else
                              f'runlocal,{kind}')
  c.dataset.data_dir = data_dir
  c.batch_size = 16
  c.eval_batch_size = 20
  c.steps_per_epoch = 2
  c.num_epochs = 2
  c.log_every_steps = 2
  c.progress_bar = False
  c.tensorboard = False
  c.dataset.prefetch = 1
  c.dataset.max_eval_examples = -1
  for key, value in updates.items():
    section, _, leaf = key.rpartition('.')
    (c[section] if section else c)[leaf] = value
  return c


@pytest.fixture(scope='module')
def mnist_dir(tmp_path_factory):
  return testing.write_synthetic_mnist(
      str(tmp_path_factory.mktemp('mnist')), 64, 40, 0)


def test_defaults_are_the_adv_token_s_keys():
  c = default.get_config()
  default.apply_tokens(c, 'adv')
  method = methods.get_method('adversarial')
  assert c.method == 'adversarial'
  assert set(method.defaults) == set(c.method_options)
  assert method.options(c) == c.method_options.to_dict()


@pytest.mark.parametrize('key, value, needle', [
    ('attack', 'cw', 'method_options.attack'),
    ('epsilon', -0.1, 'method_options.epsilon'),
    ('epsilon', float('nan'), 'method_options.epsilon'),
    ('steps', 0, 'method_options.steps'),
    ('step_size', 0.0, 'method_options.step_size'),
    ('clean_weight', 1.5, 'method_options.clean_weight'),
])
def test_bad_options_are_named(mnist_dir, key, value, needle):
  c = adv_config(mnist_dir)
  with c.unlocked():
    c.method_options[key] = value
  with pytest.raises(errors.ConfigError, match=needle) as e:
    experiment.validate_config(c)
  assert repr(value) in str(e.value) or str(value) in str(e.value)
  c = adv_config(mnist_dir)
  with c.unlocked():
    c.method_options.strength = 1.0
  with pytest.raises(errors.ConfigError, match='strength'):
    experiment.validate_config(c)


@pytest.mark.parametrize('key, value', [('random_start', 'yes'),
                                        ('steps', 2.5), ('epsilon', True),
                                        ('step_size', '0.1')])
def test_badly_typed_options_are_named(key, value):
  # A config.json edited by hand: ConfigDict's type checks are not there.
  method = methods.get_method('adversarial')
  config = types.SimpleNamespace(method_options={key: value})
  with pytest.raises(errors.ConfigError, match=f'method_options.{key}'):
    method.options(config)
  assert method.options(types.SimpleNamespace(method_options={
      'step_size': None}))['step_size'] is None


def _one_step(config):
  exp = experiment.Experiment.from_config(config)
  state = jax.tree.map(jnp.asarray, exp.init_host_state())
  batch = exp.datasets.train.batch(0)
  new_state, metrics = jax.jit(exp.train_step_fn())(state, batch)
  return exp, state, batch, new_state, metrics


@pytest.mark.parametrize('updates', [
    {'method_options.epsilon': 0.0},
    pytest.param({'method_options.clean_weight': 1.0},
                 marks=pytest.mark.slow)])
def test_no_budget_or_all_clean_weight_is_the_supervised_step(mnist_dir,
                                                              updates):
  # epsilon = 0: the adversarial batch is the clean one; clean_weight = 1:
  # only the clean loss. Either way the update is the supervised step's.
  exp, state, batch, new_state, metrics = _one_step(
      adv_config(mnist_dir, **updates))
  supervised = jax.jit(steps.make_train_step(
      exp.model.apply, exp.tx, exp.mean, exp.std))(state, batch)[0]
  for a, b in zip(jax.tree.leaves(new_state.params),
                  jax.tree.leaves(supervised.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(new_state.batch_stats),
                  jax.tree.leaves(supervised.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert set(metrics) >= {'loss', 'top1', 'loss/clean', 'loss/adversarial',
                          'adversarial/top1'}


def test_the_loss_mixes_clean_and_adversarial_cross_entropy(mnist_dir):
  c = adv_config(mnist_dir, **{'method_options.clean_weight': 0.25})
  _, _, _, _, m = _one_step(c)
  n = float(m['count'])
  # The train-mode clean and adversarial passes, weighted.
  np.testing.assert_allclose(
      float(m['loss']) / n,
      0.25 * float(m['loss/clean']) / n
      + 0.75 * float(m['loss/adversarial']) / n, rtol=1e-5)
  # The attack found a harder batch (epsilon 0.3 on MNIST).
  assert float(m['loss/adversarial']) > float(m['loss/clean'])
  assert float(m['adversarial/top1']) <= float(m['top1'])


def test_adversarial_training_trains_and_resumes(mnist_dir, tmp_path):
  config = adv_config(mnist_dir, **{'method_options.steps': 2})
  workdir = str(tmp_path / 'run')
  first = config.copy_and_resolve_references()
  first.num_train_steps = 2
  train.train_and_evaluate(first, workdir)
  summary = train.train_and_evaluate(config, workdir)
  assert summary['steps'] == 4 and summary['resumed_from'] == 2
  records = [json.loads(l) for l in open(os.path.join(workdir,
                                                      'metrics.jsonl'))]
  adv = [r['train/loss/adversarial'] for r in records
         if 'train/loss/adversarial' in r]
  assert len(adv) == 2 and all(np.isfinite(adv))
  # The stored config names the method and its options; it loads back.
  loaded = experiment.load_run_config(workdir)
  assert loaded.method == 'adversarial'
  assert loaded.method_options.steps == 2
  experiment.validate_config(loaded)


MULTI = textwrap.dedent('''
    import json, os, sys
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
    import jax, numpy as np
    from experiments import experiment, testing
    from experiments.configs import lenet5_mnist

    data_dir = testing.write_synthetic_mnist(sys.argv[1], 64, 16)
    out = {}
    for eps in (0.0, 0.3):
      for name in ('one', 'jit', 'pmap'):
        c = lenet5_mnist.get_config('runlocal,cnn,adv')
        c.dataset.data_dir = data_dir
        c.batch_size, c.eval_batch_size, c.dataset.prefetch = 16, 16, 1
        c.method_options.epsilon, c.method_options.steps = eps, 2
        c.parallelism = 'pmap' if name == 'pmap' else 'jit'
        exp = experiment.Experiment.from_config(
            c, devices=jax.devices()[:1] if name == 'one' else None)
        state = exp.runner.put_state(exp.init_host_state())
        losses = []
        for s in range(2):
          state, m = exp.train_step(state, exp.put_batch(
              exp.datasets.train.batch(s)))
          m = exp.runner.get_metrics(m)
          losses.append(float(m['loss']) / float(m['count']))
        out[f'{name}{eps}'] = losses
    print('RESULT' + json.dumps(out))
''')


@pytest.mark.slow
def test_jit_mesh_and_pmap_train_adversarially(tmp_path):
  script = tmp_path / 'run.py'
  script.write_text(MULTI)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, str(script), str(tmp_path / 'm')],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT')][-1]
  out = json.loads(line[len('RESULT'):])
  # Without a budget the attack is the identity: every layout agrees.
  for name in ('jit', 'pmap'):
    np.testing.assert_allclose(out[f'{name}0.0'], out['one0.0'], rtol=2e-5)
  # With one, each layout trains (random starts differ under pmap).
  for name in ('one', 'jit', 'pmap'):
    assert all(np.isfinite(out[f'{name}0.3'])), name
  np.testing.assert_allclose(out['jit0.3'], out['one0.3'], rtol=2e-5)


@pytest.fixture(scope='module')
def trained_run(mnist_dir, tmp_path_factory):
  """A tiny supervised CNN run (4 steps)."""
  workdir = str(tmp_path_factory.mktemp('robust') / 'run')
  config = adv_config(mnist_dir, arg='', steps_per_epoch=4, num_epochs=1)
  train.train_and_evaluate(config, workdir)
  return workdir


def test_robustness_entry_point_writes_the_tables(trained_run, tmp_path,
                                                  capsys):
  out = str(tmp_path / 'report')
  assert cli.call(robustness.main, robustness.define_flags, [
      '--workdir', trained_run, '--attacks', 'fgsm,pgd',
      '--epsilons', '0,0.3', '--steps', '2', '--noprogress_bar',
      '--out', out]) == 0
  report = json.load(open(os.path.join(out, robustness.JSON_FILE)))
  md = open(os.path.join(out, robustness.MD_FILE)).read()
  assert '| pgd |' in md and '| 0.3 |' in md and md in capsys.readouterr().out
  # The clean figure is the run's own evaluation (same examples, eval mode).
  reference = train.evaluate_checkpoint(
      experiment.load_run_config(trained_run), trained_run)
  assert report['count'] == 40 == int(reference['count'])
  assert report['clean_top1'] == pytest.approx(reference['top1'])
  by = {(r['attack'], r['epsilon']): r['top1'] for r in report['results']}
  assert len(by) == 4
  for name in ('fgsm', 'pgd'):
    assert by[(name, 0.0)] == pytest.approx(report['clean_top1'])
    assert by[(name, 0.3)] <= report['clean_top1']
  assert report['command'].startswith('python -m experiments.robustness')


def test_robustness_max_examples_and_default_out(trained_run):
  assert cli.call(robustness.main, robustness.define_flags, [
      '--workdir', trained_run, '--attacks', 'bim,mim', '--epsilons', '0.1',
      '--steps', '2', '--max_examples', '25', '--noprogress_bar']) == 0
  report = json.load(open(os.path.join(trained_run, robustness.JSON_FILE)))
  assert report['count'] == 25
  assert [(r['attack'], r['steps'], r['step_size'])
          for r in report['results']] == [('bim', 2, 0.05), ('mim', 2, 0.05)]
  assert all(r['top1'] <= report['clean_top1'] for r in report['results'])


@pytest.mark.slow
def test_robustness_with_the_exact_adder_gradient(mnist_dir, tmp_path):
  workdir = str(tmp_path / 'adder')
  train.train_and_evaluate(adv_config(mnist_dir, kind='adder', arg='',
                                      steps_per_epoch=2, num_epochs=1),
                           workdir)
  out = str(tmp_path / 'sign')
  assert cli.call(robustness.main, robustness.define_flags, [
      '--workdir', workdir, '--attacks', 'fgsm', '--epsilons', '0.2',
      '--adder_grad', 'sign', '--noprogress_bar', '--out', out]) == 0
  report = json.load(open(os.path.join(out, robustness.JSON_FILE)))
  assert report['grad'] == 'sign'
  assert "adder input gradient 'sign'" in open(
      os.path.join(out, robustness.MD_FILE)).read()


@pytest.mark.parametrize('argv, needle', [
    (['--attacks', 'fgsm,cw'], "--attacks: 'cw' is not an attack"),
    (['--epsilons', '0.1,-0.2'], '--epsilons: -0.2'),
    (['--steps', '0'], '--steps must be >= 1'),
    (['--step_size', '0'], '--step_size must be'),
    (['--max_examples', '0'], '--max_examples must be >= 1'),
    (['--adder_grad', 'exact'], 'adder_grad'),
])
def test_robustness_bad_flags_are_one_line_errors(trained_run, argv, needle,
                                                  capsys):
  with pytest.raises(SystemExit) as e:
    cli.call(robustness.main, robustness.define_flags,
             ['--workdir', trained_run, '--noprogress_bar', *argv])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert needle in err and len(err.splitlines()) == 1, err


def test_robustness_of_no_run_is_a_one_line_error(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    cli.call(robustness.main, robustness.define_flags,
             ['--workdir', str(tmp_path)])
  assert e.value.code == 2
  assert 'holds no run' in capsys.readouterr().err
