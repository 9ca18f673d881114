"""Training that survives its users (issue 15), in-process where possible.

The workdir lock, checkpoint checksums and the fallback past corrupt
checkpoints, data verification, normalisation statistics, the zoo-only
rule for workdir configs, divergence, re-runs of a finished workdir and the
CLI's one-line errors. The signal tests (SIGTERM/SIGINT/SIGKILL on the real
CLI) are in test_train_resume.py.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import checkpointing
from experiments import data
from experiments import errors
from experiments import idx
from experiments import integrity
from experiments import cli
from experiments import testing
from experiments import duties
from experiments import experiment
from experiments import train
from experiments import workdir_lock
from test_train import tiny_mnist_config as tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS='cpu')


def _read(path):
  with open(path, 'rb') as f:
    return f.read()


def _json_lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _snapshot(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      p = os.path.join(root, f)
      with open(p, 'rb') as fh:
        out[os.path.relpath(p, directory)] = hashlib.sha256(
            fh.read()).hexdigest()
  return out


def _params_digest(workdir, step):
  ckpt = checkpointing.Checkpointer(workdir, primary=False)
  state, _ = ckpt.restore_saved(step)
  ckpt.close()
  return hashlib.sha256(b''.join(np.asarray(x).tobytes()
                                 for x in jax.tree.leaves(state))).hexdigest()


@pytest.fixture(scope='module')
def mnist_dir(tmp_path_factory):
  return testing.write_synthetic_mnist(str(tmp_path_factory.mktemp('mnist')),
                                       n_train=96, n_test=40)


@pytest.fixture(scope='module')
def finished_run(mnist_dir, tmp_path_factory):
  """A finished 6-step run with checkpoints at steps 2, 4 and 6."""
  workdir = str(tmp_path_factory.mktemp('runs') / 'run')
  config = tiny_config(mnist_dir, checkpoint_every_steps=2, max_to_keep=3)
  summary = train.train_and_evaluate(config, workdir)
  return config, workdir, summary


# --- the workdir lock --------------------------------------------------------


def _hold_lock_in_child(workdir):
  code = ('import sys, time\n'
          'from experiments import workdir_lock\n'
          'workdir_lock.WorkdirLock(sys.argv[1]).acquire()\n'
          'print("locked", flush=True)\n'
          'time.sleep(300)\n')
  child = subprocess.Popen([sys.executable, '-c', code, workdir], cwd=REPO,
                           env=ENV, stdout=subprocess.PIPE, text=True)
  assert child.stdout.readline().strip() == 'locked'
  return child


def test_busy_workdir_refused_and_stale_lock_recovered(mnist_dir, tmp_path,
                                                        caplog):
  workdir = str(tmp_path / 'run')
  child = _hold_lock_in_child(workdir)
  try:
    before = _snapshot(workdir)
    t0 = time.time()
    with pytest.raises(workdir_lock.WorkdirBusyError,
                       match=rf'in use by another run \(pid {child.pid} on '
                       'host '):
      train.train_and_evaluate(tiny_config(mnist_dir), workdir)
    assert time.time() - t0 < 5  # before loading data or compiling
    assert _snapshot(workdir) == before  # nothing written
    with pytest.raises(workdir_lock.WorkdirBusyError):
      workdir_lock.WorkdirLock(workdir).probe()
  finally:
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
  # SIGKILL leaves the lock file: stale (its pid is dead), so taken over.
  lock_path = os.path.join(workdir, workdir_lock.LOCK_FILE)
  with open(lock_path) as f:
    assert json.load(f)['pid'] == child.pid
  workdir_lock.WorkdirLock(workdir).probe()  # not busy
  lock = workdir_lock.WorkdirLock(workdir)
  lock.acquire()
  assert 'Removing the stale lock' in caplog.text
  with open(lock_path) as f:
    assert json.load(f)['pid'] == os.getpid()
  lock.release()
  assert not os.path.exists(lock_path)


def test_lock_of_another_host_is_refused_with_the_path(tmp_path):
  lock_path = tmp_path / workdir_lock.LOCK_FILE
  lock_path.write_text(json.dumps({'pid': 1, 'hostname': 'elsewhere-42',
                                   'started': '2026-01-01T00:00:00Z'}))
  with pytest.raises(workdir_lock.WorkdirBusyError,
                     match=f'pid 1 on host elsewhere-42.*delete {lock_path}'):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  assert lock_path.exists()


# --- checkpoint checksums ----------------------------------------------------


def test_every_checkpoint_has_its_checksums(finished_run):
  _, workdir, _ = finished_run
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  assert sorted(os.listdir(ckpt_dir)) == ['2', '4', '6']
  for step in (2, 4, 6):
    with open(os.path.join(workdir, 'checkpoint_checksums',
                           f'{step}.json')) as f:
      manifest = json.load(f)['files']
    # Independent walk with hashlib.
    step_dir = os.path.join(ckpt_dir, str(step))
    expected = {}
    for root, _, files in os.walk(step_dir):
      for name in files:
        p = os.path.join(root, name)
        with open(p, 'rb') as fh:
          content = fh.read()
        expected[os.path.relpath(p, step_dir)] = {
            'sha256': hashlib.sha256(content).hexdigest(),
            'size': len(content)}
    assert manifest == expected and len(expected) >= 4


def _copy_run(finished_run, tmp_path, name='copy'):
  _, workdir, _ = finished_run
  copy = str(tmp_path / name)
  shutil.copytree(workdir, copy)
  return copy


def _largest_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
  return max(files, key=os.path.getsize)


def _flip_a_bit_of_step_6(finished_run, tmp_path):
  copy = _copy_run(finished_run, tmp_path)
  step_dir = os.path.join(copy, 'checkpoints', '6')
  target = _largest_file(step_dir)
  content = bytearray(_read(target))
  content[len(content) // 2] ^= 0x10
  with open(target, 'wb') as f:
    f.write(content)
  return copy, os.path.relpath(target, step_dir)


def test_flipped_bit_is_refused_naming_step_and_file(finished_run,
                                                          tmp_path):
  copy, rel = _flip_a_bit_of_step_6(finished_run, tmp_path)
  ckpt = checkpointing.Checkpointer(copy, primary=False)
  with pytest.raises(checkpointing.CheckpointCorruptError,
                     match=rf'checkpoint 6: file {rel} has sha256 .*corrupt'):
    ckpt.restore_saved(6)
  ckpt.close()
  with pytest.raises(checkpointing.CheckpointCorruptError,
                     match='checkpoint 6'):  # before compiling anything
    train.evaluate_checkpoint(experiment.load_run_config(copy), copy, step=6)
  ckpt = checkpointing.Checkpointer(copy, primary=False)
  assert ckpt.newest_verified_step() == 4
  ckpt.close()


@pytest.mark.slow
def test_evaluation_falls_back_to_the_newest_intact_checkpoint(finished_run,
                                                               tmp_path):
  copy, _ = _flip_a_bit_of_step_6(finished_run, tmp_path)
  assert train.evaluate_checkpoint(experiment.load_run_config(copy), copy)['step'] == 4


@pytest.mark.slow
def test_resume_falls_back_past_a_corrupt_checkpoint(finished_run, tmp_path,
                                                     capsys):
  config, workdir, _ = finished_run
  copy, _ = _flip_a_bit_of_step_6(finished_run, tmp_path)
  # Training resumes from step 4, moves step 6 away and ends bit-identical.
  capsys.readouterr()
  summary = train.train_and_evaluate(config, copy)
  assert summary['resumed_from'] == 4
  assert _params_digest(copy, 6) == _params_digest(workdir, 6)
  moved = os.listdir(os.path.join(copy, 'corrupt_checkpoints'))
  assert any(m.startswith('6-') for m in moved)
  steps = [r['step'] for r in _json_lines(os.path.join(copy, 'metrics.jsonl'))
           if 'eval/top1' in r]
  assert steps == [3, 6]  # no duplicate rows


@pytest.mark.parametrize('damage', ['truncated_manifest', 'garbage_metadata'])
def test_damaged_checkpoint_files_are_named_in_one_line(finished_run,
                                                        tmp_path, damage):
  copy = _copy_run(finished_run, tmp_path)
  step_dir = os.path.join(copy, 'checkpoints', '6')
  name = 'manifest.ocdbt' if damage == 'truncated_manifest' else '_METADATA'
  paths = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs
           if f == name]
  assert paths, f'no {name} in {step_dir}'
  with open(paths[0], 'wb') as f:
    f.write(b'' if damage == 'truncated_manifest' else b'{not json')
  rel = os.path.relpath(paths[0], step_dir)
  ckpt = checkpointing.Checkpointer(copy, primary=False)
  with pytest.raises(checkpointing.CheckpointCorruptError) as e:
    ckpt.restore_saved(6)
  assert f'checkpoint 6: file {rel} has ' in str(e.value)
  assert '\n' not in str(e.value)
  # Without its checksum file, Orbax's own failure is one line too.
  os.remove(os.path.join(copy, 'checkpoint_checksums', '6.json'))
  with pytest.raises(checkpointing.CheckpointCorruptError,
                     match='checkpoint 6 in .* cannot be read') as e:
    ckpt.restore_saved(6)
  assert '\n' not in str(e.value)
  ckpt.close()


def test_no_intact_checkpoint_is_an_error(finished_run, tmp_path):
  copy = _copy_run(finished_run, tmp_path)
  for step in (2, 4, 6):
    target = _largest_file(os.path.join(copy, 'checkpoints', str(step)))
    with open(target, 'r+b') as f:
      f.write(b'\xff\xff')
  config = experiment.load_run_config(copy)
  with pytest.raises(checkpointing.CheckpointCorruptError,
                     match=r'no intact checkpoint.*\(3 checkpoint\(s\) '
                     r'corrupt\)'):
    train.evaluate_checkpoint(config, copy)


# --- re-runs, recorded dataset -----------------------------------------------


def test_finished_workdir_is_not_run_again(finished_run, mnist_dir, capsys):
  config, workdir, summary = finished_run
  before = _snapshot(workdir)
  capsys.readouterr()
  again = train.train_and_evaluate(config, workdir)
  assert again == json.loads(json.dumps(summary))
  assert _snapshot(workdir) == before  # no row, no summary rewritten
  assert capsys.readouterr().out.strip().splitlines()[-1].startswith(
      'Final test accuracy: ')


def test_dataset_name_and_statistics_are_recorded(finished_run, mnist_dir):
  _, workdir, summary = finished_run
  pixels = data.load_mnist_split(mnist_dir, 'train').images / 255.0
  with open(os.path.join(workdir, 'config.json')) as f:
    stored = json.load(f)['dataset']
  assert stored['name'] == 'idx'  # the synthetic files are not MNIST
  np.testing.assert_allclose(stored['mean'], [pixels.mean()], rtol=1e-12)
  np.testing.assert_allclose(stored['std'], [pixels.std()], rtol=1e-9)
  assert summary['dataset'] == 'idx' and not summary['dataset_verified']
  assert summary['normalization'] == {'mean': stored['mean'],
                                      'std': stored['std']}
  assert experiment.load_run_config(workdir).dataset.mean == tuple(stored['mean'])


def test_explicit_and_bad_normalization(mnist_dir):
  c = tiny_config(mnist_dir)
  c.dataset.mean, c.dataset.std = (0.5,), (0.25,)
  ds = data.build_datasets(c.dataset, seed=0, global_batch_size=16,
                           eval_batch_size=20)
  assert (ds.mean, ds.std) == ((0.5,), (0.25,))
  c.dataset.mean, c.dataset.std = (0.5, 0.5), (0.25, 0.25)
  with pytest.raises(data.DataError, match=r'dataset.mean=\(0.5, 0.5\): need '
                     '1 finite'):
    data.build_datasets(c.dataset, seed=0, global_batch_size=16,
                        eval_batch_size=20)
  c.dataset.mean, c.dataset.std = (0.5,), None
  with pytest.raises(data.DataError, match='both dataset.mean and'):
    data.build_datasets(c.dataset, seed=0, global_batch_size=16,
                        eval_batch_size=20)


def test_known_dataset_is_verified_through_a_stamp(tmp_path, monkeypatch):
  d = testing.write_synthetic_mnist(str(tmp_path / 'd'), n_train=32,
                                    n_test=20)
  # Pretend these files are MNIST: their digests (hashlib) are the known ones.
  digests = {name: hashlib.sha256(_read(os.path.join(d, name))).hexdigest()
             for name in integrity.MNIST_SHA256}
  monkeypatch.setattr(integrity, 'MNIST_SHA256', digests)
  c = tiny_config(d)
  build = lambda: data.build_datasets(c.dataset, seed=0,  # noqa: E731
                                      global_batch_size=16,
                                      eval_batch_size=20)
  ds = build()
  assert ds.name == 'mnist' and ds.verified
  assert (ds.mean, ds.std) == (data.MNIST_MEAN, data.MNIST_STD)
  stamp = integrity.read_stamp(d)
  assert sorted(stamp['files']) == sorted(digests)
  # Unchanged files are not hashed again.
  calls = []
  real = integrity.content_sha256
  monkeypatch.setattr(integrity, 'content_sha256',
                      lambda p: calls.append(p) or real(p))
  assert build().verified and not calls
  # One flipped label: refused, naming the file.
  labels = os.path.join(d, 't10k-labels-idx1-ubyte')
  content = bytearray(_read(labels))
  content[-1] = (content[-1] + 1) % 10
  with open(labels, 'wb') as f:
    f.write(content)
  with pytest.raises(data.DataError,
                     match=f'{labels} was verified as mnist but has changed'):
    build()
  # Without a stamp, a copy with one bad file is refused too.
  os.remove(os.path.join(d, integrity.STAMP_FILE))
  with pytest.raises(data.DataError, match=f'{labels} is corrupt'):
    build()


REAL_MNIST = os.path.join(REPO, 'data', 'mnist')


@pytest.mark.skipif(not os.path.isdir(REAL_MNIST),
                    reason='no MNIST in data/mnist (make run fetches it)')
def test_real_mnist_is_verified_and_its_statistics_are_torchvisions(
    tmp_path):
  d = str(tmp_path / 'mnist')
  os.makedirs(d)
  for name in integrity.MNIST_SHA256:
    for suffix in ('', '.gz'):
      if os.path.exists(os.path.join(REAL_MNIST, name + suffix)):
        shutil.copy(os.path.join(REAL_MNIST, name + suffix), d)
  assert data.verify_mnist_files(d, ['train', 'test'])
  # The training set's own statistics are torchvision's MNIST constants.
  mean, std = data.pixel_mean_std(data.load_mnist_split(d, 'train').images)
  np.testing.assert_allclose(mean, data.MNIST_MEAN, atol=1e-4)
  np.testing.assert_allclose(std, data.MNIST_STD, atol=1e-4)


def test_image_larger_than_image_size_is_refused_before_writing(mnist_dir,
                                                                 tmp_path):
  workdir = tmp_path / 'run'
  with pytest.raises(data.DataError,
                     match='are 28x28, larger than dataset.image_size=20'):
    train.train_and_evaluate(tiny_config(mnist_dir, **{
        'dataset.image_size': 20}), str(workdir))
  assert not workdir.exists()


# --- code from a workdir -----------------------------------------------------


def test_model_factory_from_a_workdir_needs_trust(finished_run, tmp_path,
                                                  monkeypatch):
  _, workdir, _ = finished_run
  module_dir = tmp_path / 'mods'
  module_dir.mkdir()
  marker = tmp_path / 'imported'
  (module_dir / 'untrusted_factory_mod.py').write_text(
      f'open({str(marker)!r}, "w").close()\n'
      'def make(**kwargs):\n'
      '  from adderjax import models\n'
      '  return models.create_model("lenet5_bn", **kwargs)\n')
  monkeypatch.syspath_prepend(str(module_dir))
  copy = tmp_path / 'copy'
  copy.mkdir()
  with open(os.path.join(workdir, 'config.json')) as f:
    stored = json.load(f)
  stored['model']['name'] = 'untrusted_factory_mod:make'
  (copy / 'config.json').write_text(json.dumps(stored))
  with pytest.raises(experiment.UntrustedCodeError,
                     match="'untrusted_factory_mod:make', which would import "
                     ".*--trust_workdir_code"):
    experiment.load_run_config(str(copy))
  assert not marker.exists()
  config = experiment.load_run_config(str(copy), trust_code=True)
  experiment.create_model(config.model, 10)
  assert marker.exists()


# --- divergence --------------------------------------------------------------


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    mnist_dir, tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  # lr 1e6: the parameters overflow in step 3, the loss of step 4 is NaN.
  config = tiny_config(mnist_dir, checkpoint_every_steps=2, log_every_steps=1)
  config.optimizer.learning_rate = 1e6
  with pytest.raises(SystemExit) as e:
    cli.run_reporting_errors(
        lambda: train.train_and_evaluate(config, workdir), False)
  assert e.value.code == errors.EXIT_DIVERGED == 3
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(
      'error: training diverged: the mean training loss of steps ')
  step = int(err[0].split(' at step ')[1].split(';')[0])
  rows = _json_lines(os.path.join(workdir, 'metrics.jsonl'))
  assert rows[-1]['step'] == step and rows[-1]['train/loss'] in ('nan', 'inf')
  ckpt = checkpointing.Checkpointer(workdir, primary=False)
  last = ckpt.latest_step()
  assert last is not None and last < step
  assert f'the last good checkpoint is step {last} in' in err[0]
  state, _ = ckpt.restore_saved(last)
  ckpt.close()
  assert all(np.isfinite(np.asarray(x)).all()
             for x in jax.tree.leaves(state['params']))
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))


def test_non_finite_parameter_is_named():
  tree = {'dense': {'kernel': np.ones((2, 2), np.float32),
                    'bias': np.array([0.0, np.inf], np.float32)},
          'step': np.int32(3)}
  assert duties.all_finite(tree) == (False, "['dense']['bias']")
  tree['dense']['bias'][1] = 0.0
  assert duties.all_finite(tree) == (True, '')


# --- CLI ---------------------------------------------------------------------


def test_user_errors_are_one_line_unless_traceback_is_asked(capsys,
                                                            monkeypatch):
  def fail():
    raise checkpointing.WorkdirMismatchError('the workdir holds\na run.')
  with pytest.raises(SystemExit) as e:
    cli.run_reporting_errors(fail, False)
  assert e.value.code == errors.EXIT_USER_ERROR == 2
  assert capsys.readouterr().err == 'error: the workdir holds a run.\n'
  with pytest.raises(checkpointing.WorkdirMismatchError):
    cli.run_reporting_errors(fail, True)
  monkeypatch.setenv(errors.TRACEBACK_ENV, '1')
  assert errors.traceback_requested(False)
  with pytest.raises(SystemExit) as e:
    cli.run_reporting_errors(
        lambda: (_ for _ in ()).throw(errors.Preempted(15, 7, 'saved 7')),
        False)
  assert e.value.code == 143


def test_cli_bad_values_and_help(mnist_dir, tmp_path):
  base = [sys.executable, '-m', 'experiments.main', '--config',
          'experiments/configs/lenet5_mnist.py:runlocal,cnn']
  workdir = tmp_path / 'run'
  bad_flag = subprocess.run(
      base + ['--workdir', str(workdir), '--config.num_epochs=abc'],
      cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
  assert bad_flag.returncode == 2
  lines = bad_flag.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and 'abc' in (
      lines[0]), bad_flag.stderr
  bad_value = subprocess.run(
      base + ['--workdir', str(workdir), '--config.batch_size=-4',
              f'--config.dataset.data_dir={mnist_dir}'],
      cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
  assert bad_value.returncode == 2, bad_value.stderr[-3000:]
  assert bad_value.stderr.strip().splitlines()[-1] == (
      'error: batch_size must be a positive int, got -4.')
  assert 'Traceback' not in bad_value.stderr
  assert not workdir.exists()
  # A value only the library checks (the optimizer), a workdir that is a
  # file, a config file that does not exist: one line each, exit 2.
  afile = tmp_path / 'afile'
  afile.write_text('')
  for extra, message in (
      (['--workdir', str(workdir), '--config.optimizer.momentum=1.5',
        f'--config.dataset.data_dir={mnist_dir}'],
       'error: optimizer.momentum must be in [0, 1)'),
      (['--workdir', str(afile)],
       f'error: --workdir {afile} is a file, not a directory.'),
      (['--workdir', str(afile / 'run')],
       f'error: --workdir {afile / "run"}: {afile} is a file'),
  ):
    proc = subprocess.run(base + extra, cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors_printed = [line for line in proc.stderr.splitlines()
                      if not line[:1] in 'IWD']  # absl log lines
    assert len(errors_printed) == 1 and errors_printed[0].startswith(
        message), proc.stderr
  assert not workdir.exists()
  missing = subprocess.run(
      [sys.executable, '-m', 'experiments.main', '--config',
       'experiments/configs/nothing.py', '--workdir', str(workdir)],
      cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
  assert (missing.returncode, missing.stderr) == (
      2, "error: config file 'experiments/configs/nothing.py' does not "
      'exist.\n')
  helped = subprocess.run(base[:3] + ['--help'], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)
  for key in ('optimizer.learning_rate = 0.1', "dataset.name = 'mnist'",
              'dataset.mean = None', 'checkpoint_every_steps = -1',
              '--workdir: Directory for checkpoints', '--[no]traceback'):
    assert key in helped.stdout


def test_readme_paths_and_no_outside_references():
  with open(os.path.join(REPO, 'README.md')) as f:
    readme = f.read()
  with open(os.path.join(REPO, 'Makefile')) as f:
    makefile = f.read()
  # `make run` writes workdirs/lenet5_mnist (the Makefile's WORKDIR rule).
  assert 'workdirs/$(subst :,_,$(notdir $(basename $(CONFIG))))' in makefile
  assert 'experiments.evaluate --workdir workdirs/lenet5_mnist\n' in readme
  assert 'workdirs/lenet5_mnist_adder' not in readme
  assert 'JAX_PLATFORMS=cpu' in readme
  assert 'tensorboard --logdir' in readme
  # The training code, its configs and the model zoo cite no document
  # outside the repository.
  paths = [os.path.join(REPO, 'adderjax', 'models', '__init__.py')]
  for sub in ('experiments', os.path.join('experiments', 'configs')):
    directory = os.path.join(REPO, sub)
    paths += [os.path.join(directory, n) for n in os.listdir(directory)
              if n.endswith('.py')]
  for path in paths:
    with open(path) as f:
      text = f.read()
    for ref in ('/work/shared', 'PAPER.md', 'DESIGN.md', 'STYLE.md'):
      assert ref not in text, (path, ref)


def test_stop_request_is_agreed_by_all_processes(monkeypatch):
  """With several processes, one process's signal stops every process."""
  from jax.experimental import multihost_utils
  from experiments import preemption
  gathered = []

  def fake_allgather(x):
    gathered.append(int(x))
    # This process saw nothing; another one got SIGTERM.
    return np.array([int(x), int(signal.SIGTERM)], np.int32)

  monkeypatch.setattr(multihost_utils, 'process_allgather', fake_allgather)
  with preemption.StopRequest(sync_processes=True) as stop:
    assert stop.poll() == signal.SIGTERM
  assert gathered == [0]
  before = signal.getsignal(signal.SIGINT)
  with preemption.StopRequest(sync_processes=False) as stop:
    assert stop.poll() == 0
    os.kill(os.getpid(), signal.SIGINT)  # recorded, no KeyboardInterrupt
    assert stop.poll() == signal.SIGINT
  assert signal.getsignal(signal.SIGINT) is before  # handler restored
