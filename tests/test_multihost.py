"""Two processes on localhost (jax.distributed, gloo) vs one process."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from experiments import checkpointing
from experiments import testing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _command(workdir, data_dir, kind):
  return [sys.executable, '-m', 'experiments.main',
          '--config', f'experiments/configs/lenet5_mnist.py:runlocal,{kind}',
          '--workdir', workdir,
          f'--config.dataset.data_dir={data_dir}',
          '--config.batch_size=16', '--config.eval_batch_size=8',
          '--config.steps_per_epoch=3', '--config.num_epochs=2',
          '--config.checkpoint_every_steps=2',
          '--config.progress_bar=False']


def _final_state(workdir):
  ckpt = checkpointing.Checkpointer(workdir, primary=False)
  step = ckpt.latest_step()
  state, _ = ckpt.restore_saved(step)
  ckpt.close()
  return step, state


@pytest.mark.parametrize('kind', ['cnn'])
def test_two_processes_match_one(kind, tmp_path):
  data_dir = testing.write_synthetic_mnist(str(tmp_path / 'mnist'),
                                           n_train=64, n_test=20)
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             # Runs of one config share compiled programs (same executables,
             # compiled once): saves most of the time of the later runs.
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  env.pop('XLA_FLAGS', None)
  port = _free_port()
  multi = str(tmp_path / 'multi')
  procs = [subprocess.Popen(
      _command(multi, data_dir, kind) + [
          f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
          f'--process_id={i}'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=400)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outs.append((p.returncode, out, err))
  for rc, out, err in outs:
    assert rc == 0, err[-4000:]
  assert 'Final test accuracy' in outs[0][1]       # process 0 reports
  assert 'Final test accuracy' not in outs[1][1]
  assert '2 processes, 2 devices' in outs[0][2]

  single = str(tmp_path / 'single')
  proc = subprocess.run(_command(single, data_dir, kind), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-4000:]
  last = proc.stdout.strip().splitlines()[-1]
  assert last == outs[0][1].strip().splitlines()[-1]

  step_m, state_m = _final_state(multi)
  step_s, state_s = _final_state(single)
  assert step_m == step_s == 6
  for name in ('params', 'batch_stats', 'opt_state'):
    leaves_m = jax_leaves(state_m[name])
    leaves_s = jax_leaves(state_s[name])
    assert len(leaves_m) == len(leaves_s)
    for a, b in zip(leaves_m, leaves_s):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]
