"""SIGTERM to one process of a two-process run (jax.distributed, gloo).

Only the non-primary process gets the signal; both must stop at the same
step (they agree on it without a per-step sync: experiments/preemption.py),
process 0 writes that checkpoint, and the resumed two-process run must end
bit-identical to an uninterrupted two-process run.
"""

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import checkpointing
from experiments import testing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_PER_EPOCH = 100


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(workdir, data_dir, env):
  port = _free_port()
  base = [sys.executable, '-m', 'experiments.main',
          '--config', 'experiments/configs/lenet5_mnist.py:runlocal,cnn',
          '--workdir', workdir, f'--config.dataset.data_dir={data_dir}',
          '--config.batch_size=16', '--config.eval_batch_size=20',
          f'--config.steps_per_epoch={STEPS_PER_EPOCH}',
          '--config.num_epochs=2', '--config.checkpoint_every_steps=50',
          '--config.log_every_steps=5', '--config.progress_bar=False']
  return [subprocess.Popen(
      base + [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
              f'--process_id={i}'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]


def _finish(procs, timeout=600):
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=timeout)
      outs.append((p.returncode, out, err))
  finally:
    for p in procs:
      p.kill()
  return outs


def _digest(workdir):
  ckpt = checkpointing.Checkpointer(workdir, primary=False)
  step = ckpt.latest_step()
  state, _ = ckpt.restore_saved(step)
  ckpt.close()
  return step, hashlib.sha256(b''.join(
      np.asarray(x).tobytes() for x in jax.tree.leaves(state))).hexdigest()


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_one_step(tmp_path):
  data_dir = testing.write_synthetic_mnist(
      str(tmp_path / 'mnist'), n_train=16 * STEPS_PER_EPOCH, n_test=20)
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  env.pop('XLA_FLAGS', None)
  full = str(tmp_path / 'full')
  for rc, _, err in _finish(_launch(full, data_dir, env)):
    assert rc == 0, err[-4000:]

  stopped = str(tmp_path / 'stopped')
  procs = _launch(stopped, data_dir, env)
  metrics = os.path.join(stopped, 'metrics.jsonl')
  deadline = time.time() + 400
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if os.path.exists(metrics) and os.path.getsize(metrics):
      break
    time.sleep(0.01)
  assert all(p.poll() is None for p in procs), 'finished before the signal'
  procs[1].send_signal(signal.SIGTERM)  # the non-primary process only
  outs = _finish(procs)
  lines = [err.strip().splitlines()[-1] for _, _, err in outs]
  assert [rc for rc, _, _ in outs] == [143, 143], lines
  assert lines[0] == lines[1], lines  # the same step on both processes
  step = int(lines[0].split('saved checkpoint ')[1].split()[0])
  # Within a few steps of the signal (sent after the first log, step 5), not
  # at the next every-sync_every-steps agreement (step 100, the default).
  assert 0 < step < STEPS_PER_EPOCH, lines
  assert _digest(stopped)[0] == step

  for rc, _, err in _finish(_launch(stopped, data_dir, env)):
    assert rc == 0, err[-4000:]
  assert _digest(stopped) == _digest(full)
