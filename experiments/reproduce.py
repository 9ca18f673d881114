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

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import logging as std_logging  # pylint: disable=g-import-not-at-top,wrong-import-position
import os  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys  # pylint: disable=g-import-not-at-top,wrong-import-position


def _seeds(text: str) -> tuple[int, ...]:
  try:
    seeds = tuple(int(s) for s in text.split(',') if s.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(
        f'--seeds must be comma-separated ints, got {text!r}') from None
  if not seeds:
    raise argparse.ArgumentTypeError('--seeds is empty')
  return seeds


def _positive(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f'expected a positive int, got {text!r}')
  return value


def build_parser() -> argparse.ArgumentParser:
  """The command-line parser (``experiment`` is ``mnist`` or ``report``)."""
  p = argparse.ArgumentParser(
      prog='python -m experiments.reproduce',
      description='Reproduce the AdderNet paper\'s MNIST experiments.')
  p.add_argument('experiment', choices=('mnist', 'report'),
                 help='mnist: run everything; report: redraw the curve '
                 'figures and report.md from --out/results.json.')
  p.add_argument('--out', required=True,
                 help='output directory (PNGs, results.json, report.md).')
  size = p.add_mutually_exclusive_group()
  size.add_argument('--quick', action='store_true',
                    help='1 epoch per run (half an epoch for ablation/eta).')
  size.add_argument('--full', action='store_true',
                    help="the paper's recipe: 50 epochs for every run.")
  p.add_argument('--epochs', type=_positive, default=None,
                 help='epochs of the main CNN/AddNN/BNN runs (overrides '
                 'the plan).')
  p.add_argument('--seeds', type=_seeds, default=None,
                 help='comma-separated seeds of the main runs (default 0).')
  p.add_argument('--data_dir', default='data/mnist',
                 help='MNIST IDX files (python -m experiments.fetch_data '
                 'mnist).')
  p.add_argument('--workdir', default=None,
                 help='keep the runs\' workdirs (checkpoints, metrics) here; '
                 'default: a temporary directory, removed at the end.')
  p.add_argument('--batch_size', type=_positive, default=256,
                 help='training batch (paper: 256).')
  p.add_argument('--eval_batch_size', type=_positive, default=1000)
  p.add_argument('--max_steps_per_epoch', type=_positive, default=None,
                 help='cap the steps per epoch (smoke tests).')
  return p


def main(argv: list[str] | None = None) -> dict:
  """Runs the CLI; returns ``results.json``'s content."""
  args = build_parser().parse_args(argv)
  if args.experiment == 'report':
    from experiments.reproduce_lib import pipeline  # pylint: disable=g-import-not-at-top
    return pipeline.rerender(
        args.out, command='python -m experiments.reproduce ' +
        ' '.join(sys.argv[1:] if argv is None else argv))

  from absl import logging  # pylint: disable=g-import-not-at-top
  from experiments import data as data_lib  # pylint: disable=g-import-not-at-top
  from experiments.reproduce_lib import pipeline  # pylint: disable=g-import-not-at-top
  from experiments.reproduce_lib import plan as plan_lib  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger('absl').setLevel(std_logging.WARNING)

  name = 'quick' if args.quick else 'full' if args.full else 'default'
  plan = plan_lib.make_plan(name, main_epochs=args.epochs, seeds=args.seeds)
  train_examples = len(data_lib.load_mnist_split(args.data_dir, 'train'))
  data_lib.load_mnist_split(args.data_dir, 'test')
  data = plan_lib.DataOptions(
      data_dir=args.data_dir, batch_size=args.batch_size,
      eval_batch_size=args.eval_batch_size,
      max_steps_per_epoch=args.max_steps_per_epoch,
      train_examples=train_examples)
  command = ('python -m experiments.reproduce ' +
             ' '.join(sys.argv[1:] if argv is None else argv))
  return pipeline.reproduce_mnist(
      args.out, plan, data, workdir_root=args.workdir, command=command,
      t_start=_T0 if argv is None else None)


if __name__ == '__main__':
  main()
