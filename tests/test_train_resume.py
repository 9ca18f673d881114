"""SIGKILL a training process after a checkpoint; the resumed run must end
bit-identical to an uninterrupted one."""

import hashlib
import os
import signal
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
STEPS = 2 * STEPS_PER_EPOCH


def _command(workdir, data_dir, kind):
  return [sys.executable, '-m', 'experiments.main',
          '--config', f'experiments/configs/lenet5_mnist.py:runlocal,{kind}',
          '--workdir', workdir,
          f'--config.dataset.data_dir={data_dir}',
          '--config.batch_size=16', '--config.eval_batch_size=20',
          f'--config.steps_per_epoch={STEPS_PER_EPOCH}',
          '--config.num_epochs=2',
          '--config.checkpoint_every_steps=10', '--config.log_every_steps=1',
          '--config.max_to_keep=2', '--config.progress_bar=False']


def _state_digest(workdir):
  ckpt = checkpointing.Checkpointer(workdir, primary=False)
  step = ckpt.latest_step()
  state, _ = ckpt.restore_saved(step)
  ckpt.close()
  leaves = [np.asarray(x) for x in jax.tree.leaves(state)]
  return step, hashlib.sha256(b''.join(x.tobytes() for x in leaves)
                              ).hexdigest(), len(leaves)


@pytest.mark.parametrize(
    'kind', ['cnn', pytest.param('adder', marks=pytest.mark.slow)])
def test_sigkill_then_resume_is_bit_identical(kind, tmp_path):
  data_dir = testing.write_synthetic_mnist(
      str(tmp_path / 'mnist'), n_train=16 * STEPS_PER_EPOCH, n_test=20)
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             # Runs of one config share compiled programs (same executables,
             # compiled once): saves most of the time of the later runs.
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  killed = str(tmp_path / 'killed')
  proc = subprocess.Popen(_command(killed, data_dir, kind), cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  ckpt_dir = os.path.join(killed, 'checkpoints')
  deadline = time.time() + 400
  try:
    while time.time() < deadline and proc.poll() is None:
      if os.path.isdir(os.path.join(ckpt_dir, '10')):  # finalized (renamed)
        break
      time.sleep(0.01)
    assert proc.poll() is None, 'finished before it could be killed'
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    _, err = proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  ckpt = checkpointing.Checkpointer(killed, primary=False)
  at_kill = ckpt.latest_step()
  ckpt.close()
  assert at_kill is not None and 10 <= at_kill < STEPS, err[-2000:]

  resumed = subprocess.run(_command(killed, data_dir, kind), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=400)
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert f'Resuming from checkpoint at step {at_kill}' in resumed.stderr

  full = str(tmp_path / 'full')
  straight = subprocess.run(_command(full, data_dir, kind), cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=400)
  assert straight.returncode == 0, straight.stderr[-4000:]

  step_k, digest_k, n = _state_digest(killed)
  step_f, digest_f, _ = _state_digest(full)
  assert step_k == step_f == STEPS and n > 10
  assert digest_k == digest_f
  assert (resumed.stdout.strip().splitlines()[-1] ==
          straight.stdout.strip().splitlines()[-1])
