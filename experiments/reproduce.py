r"""Reproduces the paper's MNIST experiments with one command.

Usage::

  python -m experiments.fetch_data mnist          # once: data/mnist
  JAX_PLATFORMS=cpu python -m experiments.reproduce mnist \
      --out experiments/results/mnist             # ~1 hour on 2 CPU cores
  python -m experiments.reproduce mnist --out DIR --quick   # smoke run
  python -m experiments.reproduce mnist --out DIR --full    # paper: 50 epochs
  python -m experiments.reproduce report --out DIR  # redraw the curves
                                                    # and report.md

``mnist`` trains LeNet-5-BN as CNN, AddNN and BNN, the optimisation ablation
of the paper's Figure 4, the eta sensitivity and the LeNet++-style nets of
Figure 1, then writes into ``--out`` the figures (``fig1_features.png``,
``fig2_filters.png``, ``fig3_histograms.png``, ``fig4_ablation.png``,
``main_curves.png``, ``eta_curves.png``, ``eta_sensitivity.png``),
``results.json`` and ``report.md`` (command, seeds, versions, wall time).
See :mod:`experiments.reproduce_lib.pipeline` for what runs, and
:mod:`experiments.reproduce_lib.plan` for the epochs of each plan.
"""

from __future__ import annotations

import time

_T0 = time.time()  # before the heavy imports: the wall time covers them

# pylint: disable=g-import-not-at-top,wrong-import-position
import logging as std_logging
import os

from absl import flags
from absl import logging

from experiments import cli
from experiments import data as data_lib
from experiments import errors
from experiments.reproduce_lib import pipeline
from experiments.reproduce_lib import plan as plan_lib

#: The experiments (the one positional argument).
EXPERIMENTS = ('mnist', 'report')


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines this program's flags on ``flag_values``."""
  fv = flag_values
  flags.DEFINE_string('out', None,
                      'Output directory (PNGs, results.json, report.md).',
                      flag_values=fv)
  flags.DEFINE_bool('quick', False,
                    '1 epoch per run (half an epoch for ablation/eta).',
                    flag_values=fv)
  flags.DEFINE_bool('full', False,
                    "The paper's recipe: 50 epochs for every run.",
                    flag_values=fv)
  flags.DEFINE_integer('epochs', None, 'Epochs of the main CNN/AddNN/BNN '
                       'runs (overrides the plan).', lower_bound=1,
                       flag_values=fv)
  cli.define_list('seeds', None, 'Comma-separated seeds of the main runs '
                  '(default 0).', fv, item=int)
  flags.DEFINE_string('data_dir', 'data/mnist', 'MNIST IDX files (python -m '
                      'experiments.fetch_data mnist).', flag_values=fv)
  flags.DEFINE_string('workdir', None, "Keep the runs' workdirs "
                      '(checkpoints, metrics) here; default: a temporary '
                      'directory, removed at the end.', flag_values=fv)
  flags.DEFINE_integer('batch_size', 256, 'Training batch (paper: 256).',
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer('eval_batch_size', 1000, 'Evaluation batch.',
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer('max_steps_per_epoch', None,
                       'Cap the steps per epoch (smoke tests).',
                       lower_bound=1, flag_values=fv)
  flags.mark_flag_as_required('out', flag_values=fv)
  flags.mark_bool_flags_as_mutual_exclusive(['quick', 'full'],
                                            flag_values=fv)
  flags.register_validator('seeds', lambda seeds: seeds is None or seeds,
                           '--seeds is empty', flag_values=fv)


def main(flag_values: flags.FlagValues, args: list[str]) -> None:
  """Runs ``mnist`` (everything) or ``report`` (redraws from results.json).

  The result is in ``--out``: ``results.json``, ``report.md``, the figures.
  """
  fv = flag_values
  if len(args) != 1 or args[0] not in EXPERIMENTS:
    raise errors.UsageError(
        f'expected one argument, mnist or report, got {args} (see --help).')
  experiment = args[0]
  if experiment == 'mnist':
    cli.check_workdir(fv.out, '--out')
    if fv.workdir:
      cli.check_workdir(fv.workdir)
  command = cli.command_line('experiments.reproduce', fv, args)
  if experiment == 'report':
    results = os.path.join(fv.out, 'results.json')
    if not os.path.isfile(results):
      raise errors.UsageError(
          f'--out {fv.out}: no results.json to redraw the report from (run '
          '`python -m experiments.reproduce mnist --out DIR` first).')
    pipeline.rerender(fv.out, command=command)
    return
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger('absl').setLevel(std_logging.WARNING)

  name = 'quick' if fv.quick else 'full' if fv.full else 'default'
  plan = plan_lib.make_plan(name, main_epochs=fv.epochs,
                            seeds=None if fv.seeds is None else tuple(fv.seeds))
  train_examples = len(data_lib.load_mnist_split(fv.data_dir, 'train'))
  data_lib.load_mnist_split(fv.data_dir, 'test')
  data = plan_lib.DataOptions(
      data_dir=fv.data_dir, batch_size=fv.batch_size,
      eval_batch_size=fv.eval_batch_size,
      max_steps_per_epoch=fv.max_steps_per_epoch,
      train_examples=train_examples)
  # Run as a program, the wall time counts from the start of this module
  # (its imports included).
  pipeline.reproduce_mnist(
      fv.out, plan, data, workdir_root=fv.workdir, command=command,
      t_start=_T0 if __name__ == '__main__' else None)


if __name__ == '__main__':
  cli.run(main, define_flags)
