"""jit+mesh vs pmap vs one device, on 8 fake CPU devices (in a subprocess)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import json, os, sys
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
    import jax, numpy as np
    from experiments import data, experiment, parallel, steps, testing, train
    from experiments.configs import lenet5_mnist

    kind, data_dir = sys.argv[1], sys.argv[2]
    testing.write_synthetic_mnist(data_dir, n_train=64, n_test=16)
    c = lenet5_mnist.get_config('runlocal,' + kind)
    c.dataset.data_dir = data_dir
    ds = data.build_datasets(c.dataset, seed=0, global_batch_size=16,
                             eval_batch_size=16)
    model = experiment.create_model(c.model, 10)
    example = jax.numpy.zeros((1, 28, 28, 1))
    tx, _ = experiment.create_optimizer(c, model, example, 4)
    host = steps.init_host_state(model, tx, 0, (28, 28, 1))
    out = {'devices': jax.device_count()}
    runners = {'jit8': parallel.JitRunner(), 'pmap8': parallel.PmapRunner(),
               'one': parallel.JitRunner(jax.devices()[:1])}
    for name, runner in runners.items():
      # With the accelerators' activation recompute: BatchNorm's statistics
      # (cross-device sums under pmap) are kept, the rest recomputed.
      step = runner.compile_train(steps.make_train_step(
          model.apply, tx, ds.mean, ds.std, axis_name=runner.axis_name,
          remat='layer_outputs'))
      state = runner.put_state(host)
      losses = []
      for s in range(4):
        state, m = step(state, runner.put_batch(ds.train.batch(s), 16))
        m = runner.get_metrics(m)
        losses.append(float(m['loss']) / float(m['count']))
      final = runner.get_state(state)
      out[name] = {'losses': losses,
                   'params': [np.asarray(x).tolist() for x in
                              jax.tree.leaves(final.params)],
                   'stats': [np.asarray(x).tolist() for x in
                             jax.tree.leaves(final.batch_stats)],
                   'step': int(final.step)}
    try:
      runners['jit8'].local_rows(12)
    except ValueError as e:
      out['error'] = str(e)
    print('RESULT' + json.dumps(out))
''')


@pytest.mark.parametrize(
    'kind', ['cnn', pytest.param('adder', marks=pytest.mark.slow)])
def test_jit_mesh_and_pmap_match_one_device(kind, tmp_path):
  script = tmp_path / 'run.py'
  script.write_text(SCRIPT)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, str(script), kind,
                         str(tmp_path / 'mnist')], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT')][-1]
  out = json.loads(line[len('RESULT'):])
  assert out['devices'] == 8
  assert 'not divisible by the 8 devices' in out['error']
  one = out['one']
  assert one['step'] == 4
  assert one['losses'][-1] < one['losses'][0]  # it trains
  for name in ('jit8', 'pmap8'):
    np.testing.assert_allclose(out[name]['losses'], one['losses'],
                               rtol=2e-5, err_msg=name)
    # BN statistics of adder outputs are large sums (values ~1e2).
    for a, b in zip(out[name]['stats'], one['stats']):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5, err_msg=name)
    # Parameters: float32 reductions in another order; the adaptive LR
    # rescales every adder kernel's gradient to a fixed norm, so absolute
    # differences are at the scale of the updates (~1e-2 per step).
    for a, b in zip(out[name]['params'], one['params']):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-4, err_msg=name)
