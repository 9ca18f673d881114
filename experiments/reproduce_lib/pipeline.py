"""The MNIST reproduction, end to end: runs, figures, ``results.json``.

:func:`reproduce_mnist` trains, in this order,

1. LeNet-5-BN as CNN, AddNN and BNN (the paper's recipe) for every seed of
   the plan; each is evaluated with the running BatchNorm statistics (the
   official protocol, the headline number) and with statistics recomputed
   from 20 training batches;
2. the optimisation ablation of the paper's Figure 4: AddNN with
   {full-precision, sign} gradient x {adaptive LR, increased LR (ILR), no
   scaling}; the ILR factor is the geometric mean over the adder layers of
   the adaptive scales ``eta * sqrt(k) / ||g||`` at initialisation, so that
   ILR gives the adder layers the adaptive LR's typical size, but one
   factor for all of them;
3. the eta sensitivity (eta in 1, 0.5, 0.2, 0.1, 0.05; 0.2 is the
   ablation's full-precision + adaptive run when the two parts have the
   same length);
4. Figure 1: the LeNet++-style net of :mod:`.lenetpp` as CNN and AdderNet;

then draws Figures 1-4 from the trained parameters and writes
``results.json`` and ``report.md`` into the output directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
from importlib import metadata
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from typing import Any, Callable, Iterator

import jax
from jax.experimental.compilation_cache import compilation_cache
import numpy as np

from experiments.reproduce_lib import analysis
from experiments.reproduce_lib import figures
from experiments.reproduce_lib import plan as plan_lib
from experiments.reproduce_lib import report as report_lib
from experiments.reproduce_lib import runs

#: The paper's MNIST LeNet-5-BN accuracies (PAPER.md section 6), percent.
PAPER_ACCURACY = {'cnn': 99.4, 'adder': 99.4, 'bnn': None}

_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'ml_collections',
             'orbax-checkpoint', 'matplotlib')


def _git(*args) -> str:
  try:
    return subprocess.run(['git', *args], capture_output=True, text=True,
                          check=True, timeout=30).stdout.rstrip('\n')
  except (OSError, subprocess.SubprocessError):
    return ''


def environment() -> dict[str, Any]:
  """Versions, git state and machine facts of this process."""
  versions = {'python': platform.python_version()}
  for name in _PACKAGES:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = None
  cpu = ''
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          cpu = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:
    cores = os.cpu_count()
  dirty = _git('status', '--porcelain', '--', 'adderjax', 'experiments')
  return {
      'versions': versions,
      'git_commit': _git('rev-parse', 'HEAD').strip(),
      'git_dirty': [l[3:] for l in dirty.splitlines() if len(l) > 3],
      'cpu': cpu, 'cores': cores,
      'jax_platforms': os.environ.get('JAX_PLATFORMS'),
      'load_average_start': list(os.getloadavg()),
      'started': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
  }


@contextlib.contextmanager
def persistent_compilation_cache(path: str) -> Iterator[None]:
  """JAX's persistent compilation cache in ``path`` for the block.

  Runs that differ only in a constant (eta, seed) or not at all share their
  evaluation, BatchNorm-statistics and initialisation programs; on a loaded
  2-core machine each compilation of LeNet-5-BN's programs takes seconds.
  The previous settings are restored afterwards.
  """
  keys = ('jax_compilation_cache_dir',
          'jax_persistent_cache_min_compile_time_secs',
          'jax_persistent_cache_min_entry_size_bytes')
  previous = {k: getattr(jax.config, k) for k in keys}
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    for k, v in previous.items():
      jax.config.update(k, v)
    compilation_cache.reset_cache()


def _results_of(run_results: list[runs.RunResult]) -> list[dict[str, Any]]:
  return [r.to_json() for r in run_results]


def reproduce_mnist(out_dir: str, plan: plan_lib.Plan,
                    data: plan_lib.DataOptions, *,
                    workdir_root: str | None = None,
                    command: str | None = None,
                    t_start: float | None = None,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs the whole MNIST reproduction and writes its outputs.

  Args:
    out_dir: where the PNGs, ``results.json`` and ``report.md`` go.
    plan: epochs and seeds (:func:`plan.make_plan`).
    data: data and batch settings.
    workdir_root: parent of the runs' workdirs (checkpoints, metrics); a
      temporary directory, removed at the end, when ``None``.
    command: the command line, for the report.
    t_start: when the process started (``time.time()``), so that the wall
      time includes the imports; default now.
    log: progress lines.

  Returns:
    The ``results.json`` content.
  """
  t_start = time.time() if t_start is None else t_start
  env = environment()
  os.makedirs(out_dir, exist_ok=True)
  own_root = workdir_root is None
  root = tempfile.mkdtemp(prefix='reproduce_mnist_') if own_root else (
      workdir_root)
  os.makedirs(root, exist_ok=True)
  spe = data.steps_per_epoch
  run_kw = dict(workdir_root=root, steps_per_epoch=spe,
                train_examples=spe * data.batch_size, log=log)
  part_seconds = {}
  try:
    with persistent_compilation_cache(os.path.join(root, 'jax_cache')):
      main, scales, ilr_factor, ablation, eta_runs, fig1 = _train_all(
          plan, data, run_kw, part_seconds, log)
  finally:
    if own_root:
      shutil.rmtree(root, ignore_errors=True)

  # Figures.
  t = time.time()
  paths = {}
  paths['fig1_features'] = figures.plot_features(
      [dict(title=(f'{"AdderNet" if k == "adder" else "CNN"} '
                   f'(test accuracy {100 * r.final["top1"]:.2f}%)\n'
                   + ('numbered circles: the l1 class templates of the adder '
                      'classifier' if k == 'adder' else
                      'rays: directions of the classifier weights')),
            features=f['features'], labels=f['labels'], kind=k,
            classifier=r.params['classifier']['kernel'])
       for k, (r, f) in fig1.items()],
      os.path.join(out_dir, 'fig1_features.png'))
  cnn0, add0 = main['cnn'][0], main['adder'][0]
  paths['fig2_filters'] = figures.plot_filters(
      [dict(label=f'{figures.KIND_LABELS[k]}',
            layers=[(f'conv1 (multiplication in both nets), 5x5x1x6',
                     r.params['conv1']['kernel']),
                    (f'conv2 ({"adder" if k == "adder" else "conv"}), '
                     '5x5x6x16', r.params['conv2']['kernel'])])
       for k, r in (('adder', add0), ('cnn', cnn0))],
      os.path.join(out_dir, 'fig2_filters.png'))
  hist_panels, fits = [], []
  for layer in ('conv2', 'fc1', 'fc2'):
    for kind, r in (('adder', add0), ('cnn', cnn0)):
      w = r.params[layer]['kernel']
      fit = analysis.compare_fits(w)
      fits.append(dict(layer=layer, kind=kind, shape=list(np.shape(w)),
                       **fit))
      hist_panels.append(dict(
          title=f'{figures.KIND_LABELS[kind]} {layer} '
                f'({"adder" if kind == "adder" else "multiplication"})',
          weights=w, fits=fit))
  paths['fig3_histograms'] = figures.plot_histograms(
      hist_panels, os.path.join(out_dir, 'fig3_histograms.png'))
  part_seconds['figures'] = time.time() - t

  results = {
      'command': command,
      'plan': dataclasses.asdict(plan),
      'data': dataclasses.asdict(data),
      'steps_per_epoch': spe,
      'environment': env,
      'paper_accuracy': PAPER_ACCURACY,
      'main': {k: _results_of(v) for k, v in main.items()},
      'adaptive_scales_at_init': scales,
      'ilr_factor': ilr_factor,
      'ablation': _results_of(ablation),
      'eta': [dict(eta=e, run=r.name, **{'final': r.final,
                                         'train_curve': r.train_curve,
                                         'eval_curve': r.eval_curve,
                                         'wall_seconds': r.wall_seconds})
              for e, r in eta_runs],
      'figure1': {k: dict(r.to_json(), feature_mean=f['features'].mean(
          0).tolist(), feature_std=f['features'].std(0).tolist())
                  for k, (r, f) in fig1.items()},
      'weight_fits': fits,
      'part_seconds': part_seconds,
  }
  paths.update(draw_curve_figures(results, out_dir))
  results['figures'] = {k: os.path.basename(v) for k, v in paths.items()}
  results['environment']['load_average_end'] = list(os.getloadavg())
  results['wall_seconds'] = time.time() - t_start
  with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(out_dir, 'report.md'), 'w') as f:
    f.write(report_lib.render(results))
  log(f'wrote {out_dir}/report.md; total wall time '
      f'{results["wall_seconds"] / 60:.1f} min')
  return results


def rerender(out_dir: str, command: str | None = None) -> dict[str, Any]:
  """Redraws the curve figures and ``report.md`` from ``results.json``.

  The figures drawn from trained parameters (Figures 1-3) are left as they
  are. The redraw is recorded in ``results.json`` (``'rerendered'``) and in
  the report.

  Args:
    out_dir: a directory written by :func:`reproduce_mnist`.
    command: the command line, for the record.

  Returns:
    The updated ``results.json`` content.
  """
  path = os.path.join(out_dir, 'results.json')
  with open(path) as f:
    results = json.load(f)
  results.setdefault('rerendered', []).append({
      'command': command, 'at': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
      'git_commit': _git('rev-parse', 'HEAD').strip()})
  paths = draw_curve_figures(results, out_dir)
  results['figures'].update(
      {k: os.path.basename(v) for k, v in paths.items()})
  with open(path, 'w') as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(out_dir, 'report.md'), 'w') as f:
    f.write(report_lib.render(results))
  return results


def _epochs_text(epochs: float) -> str:
  return f'{epochs:g} epoch{"" if epochs == 1 else "s"}'


def draw_curve_figures(results: dict[str, Any], out_dir: str
                       ) -> dict[str, str]:
  """The learning-curve figures, drawn from a ``results.json`` dict.

  ``main_curves.png``, ``fig4_ablation.png``, ``eta_curves.png`` and
  ``eta_sensitivity.png`` need only the stored curves and final numbers, so
  ``python -m experiments.reproduce report`` can redraw them.

  Returns:
    ``{figure name: path}``.
  """
  plan = results['plan']
  paths = {}
  paths['main_curves'] = figures.plot_learning_curves(
      [dict(label=f'{figures.KIND_LABELS[k]} (seed {r["config"]["seed"]})',
            color=figures.KIND_COLOURS[k],
            linestyle='-' if i == 0 else ':',
            train_curve=r['train_curve'], eval_curve=r['eval_curve'])
       for k in plan_lib.MAIN_KINDS
       for i, r in enumerate(results['main'][k])],
      os.path.join(out_dir, 'main_curves.png'),
      title=f'LeNet-5-BN on MNIST, {_epochs_text(plan["main"]["epochs"])} '
            '(test accuracy with running BN statistics, as the official '
            'code)')
  paths['fig4_ablation'] = figures.plot_learning_curves(
      [dict(label=_ablation_label(r['extra']),
            color=figures.SCALING_COLOURS[r['extra']['scaling']],
            linestyle=figures.GRAD_STYLES[r['extra']['grad']],
            train_curve=r['train_curve'], eval_curve=r['eval_curve'])
       for r in results['ablation']],
      os.path.join(out_dir, 'fig4_ablation.png'),
      title=f'Figure 4: AddNN LeNet-5-BN optimisation schemes, '
            f'{_epochs_text(plan["ablation"]["epochs"])} (ILR factor '
            f'{results["ilr_factor"]:g})',
      eval_label=_curve_eval_label(plan['ablation']), zoom=False)
  paths['eta_curves'] = figures.plot_learning_curves(
      [dict(label=f'eta = {e["eta"]:g}', train_curve=e['train_curve'],
            eval_curve=e['eval_curve']) for e in results['eta']],
      os.path.join(out_dir, 'eta_curves.png'),
      title=f'AddNN LeNet-5-BN, adaptive LR with several eta, '
            f'{_epochs_text(plan["eta"]["epochs"])}',
      eval_label=_curve_eval_label(plan['eta']))
  paths['eta_sensitivity'] = figures.plot_eta(
      [e['eta'] for e in results['eta']],
      [e['final']['top1'] for e in results['eta']],
      [e['train_curve'][-1][1] if e['train_curve'] else float('nan')
       for e in results['eta']],
      os.path.join(out_dir, 'eta_sensitivity.png'),
      title=f'eta sensitivity (AddNN LeNet-5-BN, '
            f'{_epochs_text(plan["eta"]["epochs"])})')
  return paths


def _train_all(plan, data, run_kw, part_seconds, log):
  """Every training of the reproduction, in order (see the module doc)."""
  seed0 = plan.seeds[0]
  # 1. Main runs.
  t = time.time()
  main: dict[str, list[runs.RunResult]] = {k: [] for k in
                                            plan_lib.MAIN_KINDS}
  for seed in plan.seeds:
    for kind in plan_lib.MAIN_KINDS:
      cfg = plan_lib.make_config(part=plan.main, data=data, kind=kind,
                                 seed=seed)
      main[kind].append(runs.run(f'main_{kind}_seed{seed}', cfg,
                                 recalibrated_eval=True,
                                 recalibration_batches=plan_lib.RECAL_BATCHES,
                                 **run_kw))
  part_seconds['main'] = time.time() - t

  # 2. Ablation (Figure 4).
  t = time.time()
  base = plan_lib.make_config(part=plan.ablation, data=data, kind='adder',
                              seed=seed0)
  scales = runs.initial_adaptive_scales(base)
  ilr_factor = analysis.round_sig(analysis.geometric_mean(scales.values()))
  log(f'adaptive scales at init: {scales}; ILR factor {ilr_factor}')
  ablation = []
  for grad in plan_lib.ABLATION_GRADS:
    for scaling in plan_lib.ABLATION_SCALINGS:
      cfg = plan_lib.make_config(
          part=plan.ablation, data=data, kind='adder', seed=seed0,
          grad=grad, scaling=scaling,
          ilr_factor=ilr_factor if scaling == 'ilr' else None,
          recalibrate=True)
      r = runs.run(f'ablation_{grad}_{scaling}', cfg, **run_kw)
      r.extra.update(grad=grad, scaling=scaling)
      ablation.append(r)
  part_seconds['ablation'] = time.time() - t

  # 3. Eta sensitivity.
  t = time.time()
  eta_runs = []
  for eta in plan_lib.ETAS:
    reuse = [r for r in ablation if r.extra['grad'] == 'full_precision'
             and r.extra['scaling'] == 'adaptive']
    if (eta == base.optimizer.eta and plan.eta == plan.ablation and reuse):
      r = reuse[0]
    else:
      cfg = plan_lib.make_config(part=plan.eta, data=data, kind='adder',
                                 seed=seed0, eta=eta, recalibrate=True)
      r = runs.run(f'eta_{eta:g}', cfg, **run_kw)
    eta_runs.append((eta, r))
  part_seconds['eta'] = time.time() - t

  # 4. Figure 1 (LeNet++-style).
  t = time.time()
  fig1 = {}
  for kind in ('cnn', 'adder'):
    cfg = plan_lib.make_config(part=plan.figure, data=data, kind=kind,
                               seed=seed0, model=plan_lib.LENETPP,
                               recalibrate=True)
    r = runs.run(f'lenetpp_{kind}', cfg, **run_kw)
    feats = runs.test_features(cfg, r)
    r.extra['test_top1_from_features_pass'] = float(
        np.mean(feats['predictions'] == feats['labels']))
    fig1[kind] = (r, feats)
  part_seconds['figure1'] = time.time() - t
  return main, scales, ilr_factor, ablation, eta_runs, fig1


def _ablation_label(extra: dict[str, Any]) -> str:
  grad = {'full_precision': 'full-precision grad', 'sign': 'sign grad'}[
      extra['grad']]
  scaling = {'adaptive': 'adaptive LR', 'ilr': 'increased LR',
             'none': 'no scaling'}[extra['scaling']]
  return f'{grad} + {scaling}'


def _curve_eval_label(part: dict[str, Any]) -> str:
  if part['evals_per_epoch'] > 1:
    return (f'test (first {plan_lib.CURVE_EVAL_EXAMPLES} images, '
            'recalibrated BN)')
  return 'test (recalibrated BN)'
