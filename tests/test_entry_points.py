"""Every entry point answers a user error with one line and exit 2 (issue 32).

One subprocess per program (``python -m experiments.X``), each given a
wrong input that the program itself must catch: the exit status is 2,
stderr has at most two non-empty lines (absl's log lines aside), it names
the bad value, and there is no traceback. ``--traceback`` (and
``ADDERJAX_TRACEBACK=1``) shows the traceback instead, for errors found
while the flags are parsed too. A subprocess costs ~5-10 s of imports: one
case per program here; more cases of main are in test_train_robustness.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from experiments import cli
from experiments import convert_official
from experiments import main
from experiments import reproduce

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# absl log lines (I1207 06:23:08.757579 ... main.py:77] ...) are not errors.
_LOG_LINE = re.compile(r'^[IWDE]\d{4} \d\d:\d\d:\d\d')


def _env(**extra):
  env = dict(os.environ, JAX_PLATFORMS='cpu', **extra)
  if 'ADDERJAX_TRACEBACK' not in extra:
    env.pop('ADDERJAX_TRACEBACK', None)
  return env


def _run(module, args, env=None):
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO,
                        env=env or _env(), capture_output=True, text=True,
                        timeout=240)


def _error_lines(stderr):
  return [line for line in stderr.splitlines()
          if line.strip() and not _LOG_LINE.match(line)]


def _cases(tmp):
  """(module, args, words the error must contain), one per entry point."""
  noget = os.path.join(tmp, 'noget.py')
  with open(noget, 'w') as f:
    f.write('x = 1\n')
  afile = os.path.join(tmp, 'afile')
  with open(afile, 'w') as f:
    f.write('')
  none = os.path.join(tmp, 'none')
  return [
      ('experiments.main', ['--config', noget, '--workdir',
                            os.path.join(tmp, 'run')],
       [noget, 'get_config']),
      ('experiments.evaluate', ['--workdir', none], [none, 'holds no run']),
      ('experiments.quantize', ['--workdir', none, '--bits', '9'],
       ['--bits', '9', '4..8']),
      ('experiments.convert_official',
       ['--checkpoint', os.path.join(tmp, 'nope.pth'), '--workdir',
        os.path.join(tmp, 'new')], ['--checkpoint', 'nope.pth']),
      ('experiments.fetch_data', ['mnist', '--data_dir',
                                  os.path.join(afile, 'mnist')],
       ['--data_dir', afile, 'is a file']),
      ('experiments.aot', ['--config', 'experiments/configs/lenet5_mnist.py',
                           '--kinds', 'adder,shift'],
       ['--kinds', "'shift'", "'adder'"]),
      ('experiments.reproduce', ['nosuch', '--out',
                                 os.path.join(tmp, 'out')],
       ["'nosuch'", 'mnist']),
      ('experiments.benchmarks.device_check', ['--time_limit=-1'],
       ['--time_limit', '-1']),
  ]


_MODULES = ['experiments.main', 'experiments.evaluate', 'experiments.quantize',
            'experiments.convert_official', 'experiments.fetch_data',
            'experiments.aot', 'experiments.reproduce',
            'experiments.benchmarks.device_check']


@pytest.mark.parametrize('module', _MODULES)
def test_user_error_is_one_line_and_exit_2(module, tmp_path):
  cases = {m: (args, words) for m, args, words in _cases(str(tmp_path))}
  assert set(cases) == set(_MODULES)
  args, words = cases[module]
  proc = _run(module, args)
  lines = _error_lines(proc.stderr)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert 1 <= len(lines) <= 2, proc.stderr[-3000:]
  assert lines[0].startswith('error: '), lines
  text = ' '.join(lines)
  for word in words:
    assert word in text, (word, text)
  # Nothing was created where the error was found.
  for name in ('run', 'new', 'out'):
    assert not (tmp_path / name).exists()


def test_traceback_flag_and_environment_show_the_traceback(tmp_path):
  noget = tmp_path / 'noget.py'
  noget.write_text('x = 1\n')
  base = ['--config', str(noget), '--workdir', str(tmp_path / 'run')]
  # An error found while the flags are parsed (the config file) ...
  shown = _run('experiments.main', base + ['--traceback'])
  assert shown.returncode not in (0, 2), shown.stderr[-3000:]
  assert 'Traceback (most recent call last)' in shown.stderr
  assert 'defines no get_config() function' in shown.stderr
  # ... and one found by the program, through the environment variable.
  env = _run('experiments.evaluate', ['--workdir', str(tmp_path / 'none')],
             env=_env(ADDERJAX_TRACEBACK='1'))
  assert env.returncode not in (0, 2), env.stderr[-3000:]
  assert 'Traceback (most recent call last)' in env.stderr
  assert 'NoRunError' in env.stderr and 'holds no run' in env.stderr


# More user errors, run in this process (experiments.cli.call: the same
# output and exit status as the program, without the subprocess's imports).


def _in_process_cases(tmp):
  afile = os.path.join(tmp, 'afile')
  with open(afile, 'w') as f:
    f.write('')
  empty = os.path.join(tmp, 'empty.pth')
  with open(empty, 'wb') as f:
    f.write(b'')
  corrupt = os.path.join(tmp, 'corrupt.npz')
  with open(corrupt, 'wb') as f:
    f.write(b'PK\x03\x04' + bytes(range(200)))
  new = os.path.join(tmp, 'new')
  return [
      ('reproduce', ['mnist', '--out', afile], ['--out', 'is a file']),
      ('reproduce', ['report', '--out', os.path.join(tmp, 'none')],
       ['--out', 'no results.json']),
      ('reproduce', ['report', '--out', afile], ['--out', 'no results.json']),
      ('reproduce', ['mnist', '--out', os.path.join(tmp, 'o'), '--workdir',
                     os.path.join(afile, 'w')], ['--workdir', 'is a file']),
      ('convert_official', ['--checkpoint', empty, '--workdir', new],
       ['--checkpoint', 'empty.pth', 'not a valid', 'empty']),
      ('convert_official', ['--checkpoint', corrupt, '--workdir', new],
       ['--checkpoint', 'corrupt.npz', 'not a valid']),
      ('convert_official', ['--checkpoint', afile, '--workdir', new],
       ['--checkpoint', 'unknown suffix']),
      ('main', ['--config', 'experiments/configs/lenet5_mnist.py:cnn',
                '--workdir', new, '--num_processes', '0'],
       ['--num_processes', '0']),
      ('main', ['--config', 'experiments/configs/lenet5_mnist.py:cnn',
                '--workdir', new, '--process_id=-1'],
       ['--process_id', '-1']),
  ]


@pytest.mark.parametrize('index', range(9))
def test_more_user_errors_in_process(index, tmp_path, capsys, monkeypatch):
  monkeypatch.delenv('ADDERJAX_TRACEBACK', raising=False)
  cases = _in_process_cases(str(tmp_path))
  assert len(cases) == 9
  program, argv, words = cases[index]
  module = {'reproduce': reproduce, 'main': main,
            'convert_official': convert_official}[program]
  with pytest.raises(SystemExit) as e:
    cli.call(module.main, module.define_flags, argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  lines = _error_lines(err)
  assert len(lines) == 1 and lines[0].startswith('error: '), err
  for word in words:
    assert word in err, (word, err)
  assert not (tmp_path / 'new').exists() and not (tmp_path / 'o').exists()
