"""Stopping the training CLI from outside, then resuming it.

Real ``python -m experiments.main`` processes on a tiny synthetic IDX
dataset. Every interrupted run is compared with one uninterrupted run of the
same command (shared by the tests of a kind): the final checkpoint must be
bit-identical, and so must the logged training metrics and the final
evaluation.

* SIGKILL after a checkpoint: the resumed run recovers the stale workdir lock
  and continues from that checkpoint.
* SIGTERM (the preemption signal of TPU VMs and schedulers) and SIGINT
  (Ctrl-C): the run saves a checkpoint at the next step boundary and exits
  with one line and status 128 + signal.
* A second run on a workdir in use is refused within seconds, naming the
  holder.
"""

import hashlib
import json
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
from experiments import workdir_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_PER_EPOCH = 60
STEPS = 2 * STEPS_PER_EPOCH
LOG_EVERY = 7  # not a divisor of the checkpoint steps: partial windows


def _command(workdir, data_dir, kind):
  return [sys.executable, '-m', 'experiments.main',
          '--config', f'experiments/configs/lenet5_mnist.py:runlocal,{kind}',
          '--workdir', workdir,
          f'--config.dataset.data_dir={data_dir}',
          '--config.batch_size=16', '--config.eval_batch_size=20',
          f'--config.steps_per_epoch={STEPS_PER_EPOCH}',
          '--config.num_epochs=2',
          '--config.checkpoint_every_steps=10',
          f'--config.log_every_steps={LOG_EVERY}',
          '--config.max_to_keep=2', '--config.progress_bar=False']


def _state_digest(workdir):
  ckpt = checkpointing.Checkpointer(workdir, primary=False)
  step = ckpt.latest_step()
  state, _ = ckpt.restore_saved(step)
  ckpt.close()
  leaves = [np.asarray(x) for x in jax.tree.leaves(state)]
  return step, hashlib.sha256(b''.join(x.tobytes() for x in leaves)
                              ).hexdigest(), len(leaves)


def _metric_rows(workdir):
  """metrics.jsonl without the wall-clock throughput."""
  rows = []
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      record.pop('train/images_per_second', None)
      rows.append(record)
  return rows


def _wait_for(predicate, proc, timeout=400):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if predicate():
      return True
    time.sleep(0.01)
  return False


class _Kind:
  """The data, environment and uninterrupted run of one model kind."""

  def __init__(self, kind, root):
    self.kind = kind
    self.root = root
    self.data_dir = testing.write_synthetic_mnist(
        str(root / 'mnist'), n_train=16 * STEPS_PER_EPOCH, n_test=20)
    self.env = dict(
        os.environ, JAX_PLATFORMS='cpu',
        # Runs of one config share compiled programs (same executables,
        # compiled once): saves most of the time of the later runs.
        JAX_COMPILATION_CACHE_DIR=str(root / 'jax_cache'),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
    self.full = str(root / 'full')
    # The uninterrupted run; while it holds its workdir, a second run on it
    # must be refused at once.
    proc = subprocess.Popen(self.command(self.full), cwd=REPO, env=self.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lock_path = os.path.join(self.full, workdir_lock.LOCK_FILE)
    try:
      assert _wait_for(lambda: os.path.exists(lock_path), proc)
      t0 = time.time()
      self.busy = subprocess.run(self.command(self.full), cwd=REPO,
                                 env=self.env, capture_output=True, text=True,
                                 timeout=120)
      self.busy_seconds = time.time() - t0
      self.busy_still_running = proc.poll() is None
      self.full_pid = proc.pid
      out, err = proc.communicate(timeout=600)
    finally:
      proc.kill()
    assert proc.returncode == 0, err[-4000:]
    self.full_stdout = out

  def command(self, workdir):
    return _command(workdir, self.data_dir, self.kind)

  def run(self, workdir):
    return subprocess.run(self.command(workdir), cwd=REPO, env=self.env,
                          capture_output=True, text=True, timeout=400)

  def assert_same_as_uninterrupted(self, workdir, stdout):
    step_k, digest_k, n = _state_digest(workdir)
    step_f, digest_f, _ = _state_digest(self.full)
    assert step_k == step_f == STEPS and n > 10
    assert digest_k == digest_f
    assert _metric_rows(workdir) == _metric_rows(self.full)
    assert (stdout.strip().splitlines()[-1] ==
            self.full_stdout.strip().splitlines()[-1])


_KINDS = {}


@pytest.fixture(scope='module', params=[
    'cnn', pytest.param('adder', marks=pytest.mark.slow),
    # PKKD: the CNN teacher, the adder student and the alignment together.
    pytest.param('adder,pkkd', marks=pytest.mark.slow)])
def kind(request, tmp_path_factory):
  if request.param not in _KINDS:
    _KINDS[request.param] = _Kind(request.param,
                                  tmp_path_factory.mktemp(request.param))
  return _KINDS[request.param]


def test_busy_workdir_is_refused_naming_the_holder(kind):
  assert kind.busy_still_running, 'the first run ended before the check'
  assert kind.busy.returncode == 2, kind.busy.stderr[-3000:]
  lines = kind.busy.stderr.strip().splitlines()
  assert len(lines) == 1, lines
  assert lines[0].startswith(f'error: workdir {kind.full} is in use by '
                             f'another run (pid {kind.full_pid} on host ')
  assert kind.busy_seconds < 15
  assert not os.path.exists(os.path.join(kind.full, workdir_lock.LOCK_FILE))


def test_sigkill_then_resume_is_bit_identical(kind):
  killed = str(kind.root / 'killed')
  proc = subprocess.Popen(kind.command(killed), cwd=REPO, env=kind.env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  ckpt_dir = os.path.join(killed, 'checkpoints')
  try:
    # Orbax renames the finished step directory to '10'.
    _wait_for(lambda: os.path.isdir(os.path.join(ckpt_dir, '10')), proc)
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
  # The killed run's lock is left behind, naming a dead process.
  with open(os.path.join(killed, workdir_lock.LOCK_FILE)) as f:
    assert json.load(f)['pid'] == proc.pid

  resumed = kind.run(killed)
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert 'Removing the stale lock' in resumed.stderr
  assert f'Resuming from checkpoint at step {at_kill}' in resumed.stderr
  kind.assert_same_as_uninterrupted(killed, resumed.stdout)


def _stop_with(kind, signum, name):
  workdir = str(kind.root / name)
  proc = subprocess.Popen(kind.command(workdir), cwd=REPO, env=kind.env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  try:
    _wait_for(lambda: os.path.exists(metrics) and os.path.getsize(metrics),
              proc)
    assert proc.poll() is None, 'finished before the signal'
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
  finally:
    proc.kill()
  return workdir, proc.returncode, out, err


@pytest.mark.parametrize('signum', [
    signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signal_saves_at_the_step_boundary_and_resumes(kind, signum):
  name = signal.Signals(signum).name
  workdir, rc, out, err = _stop_with(kind, signum, name.lower())
  assert rc == 128 + signum, err[-4000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith(f'stopped: {name}: saved checkpoint '), last
  assert 'Traceback' not in err
  step = int(last.split('saved checkpoint ')[1].split()[0])
  assert LOG_EVERY <= step < STEPS
  assert 'Final test accuracy' not in out
  ckpt = checkpointing.Checkpointer(workdir, primary=False)
  assert ckpt.latest_step() == step
  assert ckpt.verify(step)  # its checksum file was written
  ckpt.close()
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))
  with open(os.path.join(workdir, 'summary.json')) as f:
    first = json.load(f)
  assert not first['finished'] and first['steps'] == step

  resumed = kind.run(workdir)
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert f'Resuming from checkpoint at step {step}' in resumed.stderr
  kind.assert_same_as_uninterrupted(workdir, resumed.stdout)
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  # The first segment's timing is kept; the resumed one is added.
  assert summary['segments'][0] == first['segments'][0]
  assert summary['segments'][0]['stopped_by'] == name
  assert [(s['start_step'], s['stop_step']) for s in summary['segments']] == [
      (0, step), (step, STEPS)]
  assert summary['finished'] and summary['resumed_from'] == step
  assert summary['wall_seconds'] == pytest.approx(
      sum(s['wall_seconds'] for s in summary['segments']))
