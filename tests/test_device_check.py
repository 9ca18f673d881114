"""The device check works before a GPU appears: its smoke mode, end to end.

``python -m experiments.benchmarks.device_check OUTDIR --smoke`` runs every
piece on the CPU (tiny layers, interpret-mode kernels); here it runs as the
shell would, with one piece forced to fail, and the files it writes are
read back. The parent's handling of a worker that crashes or overruns its
time is tested with stand-in worker commands (no JAX in them).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time

import pytest

from experiments import cli
from experiments.benchmarks import device_check as dc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_cli(outdir, *flags, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(
      [sys.executable, '-m', 'experiments.benchmarks.device_check',
       str(outdir), '--smoke', *flags],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
      check=False)


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  """The smoke mode, with the CNN train step forced to fail."""
  outdir = tmp_path_factory.mktemp('device_check')
  t0 = time.time()
  proc = _run_cli(outdir, '--fail_piece=train_step_cnn')
  wall = time.time() - t0
  with open(outdir / dc.JSON_FILE) as f:
    report = json.load(f)
  with open(outdir / dc.MD_FILE) as f:
    markdown = f.read()
  return proc, report, markdown, wall


def test_smoke_writes_both_files_with_every_piece(smoke_run):
  proc, report, markdown, wall = smoke_run
  # A failed piece is in the files, and in the exit status; not a crash.
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stdout
  assert set(report['pieces']) == set(dc.PIECES)
  assert report['mode'] == 'smoke'
  assert report['env']['kernel_backend'] == 'pallas_gpu_interpret'
  assert report['env']['platform'] == 'cpu'
  assert report['wall_s'] < wall
  for piece in dc.PIECES:
    assert report['pieces'][piece]['rows'], piece
    assert f'| {piece} ' in markdown
  for heading in ('## Summary', '## Kernel check', '## Kernel timing',
                  '## ResNet-20 train step', '## MNIST'):
    assert heading in markdown
  # Progress lines as it goes.
  assert 'kernel_check: start' in proc.stdout
  assert 'mnist: lenet5_mnist adder: ok' in proc.stdout


def test_smoke_kernel_check_rows_are_within_tolerance(smoke_run):
  _, report, _, _ = smoke_run
  piece = report['pieces']['kernel_check']
  assert piece['status'] == 'ok'
  assert len(piece['rows']) == len(dc.SMOKE_CHECK)
  for row in piece['rows']:
    assert row['status'] == 'ok', row
    for part in ('fwd', 'dx', 'dw'):
      assert math.isfinite(row[f'{part}_max_abs'])
      assert row[f'{part}_over_tol'] <= 1.0, (row['case'], part)
    assert row['fwd_reduction'] == row['k']
    assert row['dw_reduction'] == row['m']


def test_smoke_timing_train_step_and_mnist_rows(smoke_run):
  _, report, markdown, _ = smoke_run
  pieces = report['pieces']
  (timing,) = pieces['kernel_timing']['rows']
  assert timing['status'] == 'ok', timing
  for name in ('conv', 'xla', 'pallas', 'unfold'):
    for part in ('f', 'fb'):
      assert timing[f'{name}_{part}_ms'] > 0, (name, part)
  assert timing['pallas_vs_conv_f'] == pytest.approx(
      timing['pallas_f_ms'] / timing['conv_f_ms'])
  (adder,) = pieces['train_step_adder']['rows']
  assert adder['status'] == 'ok', adder
  assert adder['batch'] == 4 and adder['images_per_s'] > 0
  assert adder['peak_mb'] > 0 and adder['peak_source'] == 'memory_analysis'
  (mnist,) = pieces['mnist']['rows']
  assert mnist['status'] == 'ok', mnist
  assert mnist['steps'] == 3 and mnist['data'] == 'synthetic'
  assert 0.0 <= mnist['top1'] <= 1.0
  assert '| lenet5_mnist adder' in markdown


def test_smoke_forced_failure_is_a_row(smoke_run):
  _, report, markdown, _ = smoke_run
  piece = report['pieces']['train_step_cnn']
  assert piece['status'] == 'failed'
  (row,) = piece['rows']
  assert row['case'] == '(piece)' and row['status'] == 'error'
  assert 'forced failure of piece train_step_cnn' in row['error']
  assert 'forced failure of piece train_step_cnn' in markdown
  # The pieces after it still ran.
  assert report['pieces']['train_step_adder']['status'] == 'ok'
  assert report['pieces']['mnist']['status'] == 'ok'


def test_worker_process_crash_is_a_row(tmp_path):
  proc = _run_cli(tmp_path, '--pieces=kernel_check,kernel_timing',
                  '--crash_piece=kernel_check', '--isolate')
  assert proc.returncode == 1, proc.stderr[-2000:]
  with open(tmp_path / dc.JSON_FILE) as f:
    report = json.load(f)
  (row,) = report['pieces']['kernel_check']['rows']
  assert row['case'] == '(piece)'
  assert row['status'].startswith('error: the worker process died (exit '
                                  'code 70)')
  assert '--crash_piece' in row['status']  # the worker's last stderr line
  assert report['pieces']['kernel_check']['status'] == 'failed'
  # Its own worker: the timing still ran.
  assert report['pieces']['kernel_timing']['status'] == 'ok'
  assert report['pieces']['mnist']['rows'] == [
      {'case': '(piece)', 'status': 'skipped: not selected'}]


def _fake_worker(records, body):
  """A stand-in worker: writes ``records`` (JSON lines), then ``body``."""
  lines = [json.dumps(r) for r in records]
  script = textwrap.dedent(f"""
      import sys, time
      with open(sys.argv[1], 'a') as f:
        for line in {lines!r}:
          f.write(line + '\\n')
      {body}
  """)
  return [sys.executable, '-c', script]


def _pieces():
  return {p: {'status': 'not run', 'seconds': None, 'rows': []}
          for p in dc.PIECES}


def test_crashed_worker_rows(tmp_path):
  records = str(tmp_path / 'r.jsonl')
  log = str(tmp_path / 'w.log')
  cmd = _fake_worker(
      [{'type': 'env', 'mode': 'smoke'},
       {'type': 'start', 'piece': 'kernel_check'},
       {'type': 'plan', 'piece': 'kernel_check', 'cases': ['a', 'b']},
       {'type': 'row', 'piece': 'kernel_check', 'case': 'a',
        'status': 'ok'}],
      "print('Fatal: illegal memory access', file=sys.stderr); sys.exit(3)")
  pieces = _pieces()
  env = dc.run_group(cmd + [records], ['kernel_check', 'kernel_timing'],
                     time.time() + 60, records, log, pieces)
  assert env == {'mode': 'smoke'}
  rows = pieces['kernel_check']['rows']
  assert [r['case'] for r in rows] == ['(piece)', 'a', 'b']
  assert rows[0]['status'] == ('error: the worker process died (exit code 3)'
                               ': Fatal: illegal memory access')
  assert rows[2]['status'] == 'error: running when the worker died'
  assert pieces['kernel_timing']['rows'] == [
      {'case': '(piece)', 'status': 'skipped: the worker died in '
                                    'kernel_check'}]
  assert dc.piece_status(rows) == 'failed'
  assert dc.piece_status(pieces['kernel_timing']['rows']) == 'skipped'


def test_overrunning_worker_is_stopped(tmp_path):
  records = str(tmp_path / 'r.jsonl')
  cmd = _fake_worker([{'type': 'start', 'piece': 'train_step_cnn'}],
                     'time.sleep(60)')
  pieces = _pieces()
  t0 = time.time()
  dc.run_group(cmd + [records], ['train_step_cnn', 'train_step_adder'],
               time.time() + 1.5, records, str(tmp_path / 'w.log'), pieces)
  assert time.time() - t0 < 30
  (row,) = pieces['train_step_cnn']['rows']
  assert row['status'].startswith('skipped: time budget (the worker was '
                                  'stopped after')
  assert dc.piece_status([row]) == 'skipped'
  assert pieces['train_step_adder']['rows'] == [
      {'case': '(piece)', 'status': dc.SKIPPED_BUDGET}]


def test_report_ratios_and_markdown(tmp_path):
  pieces = _pieces()
  pieces['train_step_cnn']['rows'] = [
      {'case': 'cnn b4', 'status': 'ok', 'batch': 4, 'step_ms': 10.0,
       'peak_mb': 100.0}]
  pieces['train_step_adder']['rows'] = [
      {'case': 'adder b4', 'status': 'ok', 'batch': 4, 'step_ms': 25.0,
       'peak_mb': 150.0},
      {'case': 'adder b8', 'status': dc.SKIPPED_BUDGET, 'batch': 8}]
  pieces['kernel_check']['rows'] = [
      {'case': 'resnet20 stem 3x3', 'status': 'error',
       'error': 'XlaRuntimeError: INTERNAL: Triton | failed'}]
  report = {'command': 'python -m x', 'date': 'today', 'time_limit_s': 345.0,
            'wall_s': float('nan'), 'env': None, 'mode': 'full',
            'pieces': pieces}
  dc.write_report(str(tmp_path), report)
  with open(tmp_path / dc.JSON_FILE) as f:
    stored = json.load(f)  # strict JSON: NaN became null
  assert stored['wall_s'] is None
  adder = stored['pieces']['train_step_adder']['rows'][0]
  assert adder['vs_cnn_time'] == pytest.approx(2.5)
  assert adder['vs_cnn_peak'] == pytest.approx(1.5)
  assert stored['pieces']['train_step_adder']['status'] == 'partial'
  assert stored['pieces']['kernel_check']['status'] == 'failed'
  with open(tmp_path / dc.MD_FILE) as f:
    markdown = f.read()
  assert '2.50x' in markdown and '1.50x' in markdown
  # A '|' of an error message does not break the table.
  assert 'Triton / failed' in markdown


def test_deadlines_share_the_time_left():
  deadlines = dc.allocate_deadlines(0.0, 140.0, ['kernel_check',
                                                 'kernel_timing'], dc.PIECES)
  total = sum(dc.WEIGHTS.values())
  assert deadlines == pytest.approx([140 * 3 / total, 140 * 7 / total])


@pytest.mark.parametrize('argv', [[], ['a', 'b'], ['out', '--pieces=gpu'],
                                  ['out', '--fail_piece=nothing']])
def test_usage_errors_exit_2(argv, capsys):
  with pytest.raises(SystemExit) as e:
    cli.call(dc.main, dc.define_flags, argv)
  assert e.value.code == 2
  assert capsys.readouterr().err.startswith('error: ')
