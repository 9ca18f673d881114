"""What the MNIST reproduction runs: the run plan and each run's config.

Every run is a config of ``experiments/configs/lenet5_mnist.py`` (the
paper's recipe: SGD momentum 0.9, weight decay 5e-4, batch 256, lr 0.1 with
the official per-epoch cosine), trained by ``experiments.train``. Only the
number of epochs differs between the plans:

* ``full``: the paper's 50 epochs for every run (main, ablation, eta,
  Figure 1), one evaluation per epoch;
* ``default``: sized for about an hour on two shared CPU cores (see
  :data:`DEFAULT`);
* ``quick``: one epoch (half an epoch for the ablation and eta runs), for
  smoke tests.

A :class:`Part` trains ``epochs`` epochs and evaluates ``evals_per_epoch``
times per epoch. More than one evaluation per epoch (the learning curves of
short runs) is done with the train loop's ``steps_per_epoch``: each "epoch"
of the loop is then a chunk of ``steps_per_epoch // evals_per_epoch`` steps,
drawn from a fresh seeded permutation, and the per-epoch cosine schedule has
one stair per chunk.

Examples:
  >>> plan = make_plan('default')
  >>> plan.main.epochs, plan.ablation.epochs
  (8, 1)
  >>> make_plan('full').eta.epochs
  50
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from experiments.configs import lenet5_mnist

#: The paper's number of epochs for MNIST LeNet-5-BN (PAPER.md section 5).
PAPER_EPOCHS = 50
#: MNIST training images.
MNIST_TRAIN = 60000
#: LeNet++-style model factory for the train loop.
LENETPP = 'experiments.reproduce_lib.lenetpp:create_lenetpp'
#: Batches used to recompute BatchNorm statistics before an evaluation in
#: the ablation, eta and Figure 1 runs ("precise BN", see experiments.train).
RECAL_BATCHES = 20
#: Test images in the intermediate evaluations of chunked runs (the final
#: accuracy is always on the whole test set).
CURVE_EVAL_EXAMPLES = 2000

ABLATION_GRADS = ('full_precision', 'sign')
ABLATION_SCALINGS = ('adaptive', 'ilr', 'none')
ETAS = (1.0, 0.5, 0.2, 0.1, 0.05)
MAIN_KINDS = ('cnn', 'adder', 'bnn')


@dataclasses.dataclass(frozen=True)
class Part:
  """Epochs and evaluations of one group of runs.

  Attributes:
    epochs: training epochs (a multiple of ``1 / evals_per_epoch``).
    evals_per_epoch: evaluations per epoch (the points of its curves).
  """
  epochs: float
  evals_per_epoch: int = 1

  def __post_init__(self):
    if not isinstance(self.evals_per_epoch, int) or self.evals_per_epoch < 1:
      raise ValueError(f'evals_per_epoch must be a positive int, got '
                       f'{self.evals_per_epoch!r}.')
    chunks = self.epochs * self.evals_per_epoch
    if self.epochs <= 0 or abs(chunks - round(chunks)) > 1e-9:
      raise ValueError(f'epochs={self.epochs!r} must be a positive multiple '
                       f'of 1/evals_per_epoch = 1/{self.evals_per_epoch}.')

  @property
  def num_chunks(self) -> int:
    return int(round(self.epochs * self.evals_per_epoch))


@dataclasses.dataclass(frozen=True)
class Plan:
  """The whole reproduction.

  Attributes:
    name: ``'quick'``, ``'default'`` or ``'full'``.
    main: LeNet-5-BN as CNN, AddNN and BNN.
    ablation: the six optimisation variants of Figure 4.
    eta: the eta sensitivity runs.
    figure: the LeNet++-style runs of Figure 1.
    seeds: seeds of the main runs (the other runs use the first).
  """
  name: str
  main: Part
  ablation: Part
  eta: Part
  figure: Part
  seeds: tuple[int, ...] = (0,)


#: Sized for ~60 minutes on 2 shared CPU cores (~75 s per LeNet-5-BN epoch
#: there under load, plus ~20-40 s of compilation per run): 3 x 8 main
#: epochs, 6 ablation and 4 extra eta runs of 1 epoch (quarter-epoch curve
#: points), 2 x 2 epochs for Figure 1.
DEFAULT = Plan('default', main=Part(8), ablation=Part(1, 4),
               eta=Part(1, 4), figure=Part(2))
QUICK = Plan('quick', main=Part(1), ablation=Part(0.5, 2), eta=Part(0.5, 2),
             figure=Part(1))
FULL = Plan('full', main=Part(PAPER_EPOCHS), ablation=Part(PAPER_EPOCHS),
            eta=Part(PAPER_EPOCHS), figure=Part(PAPER_EPOCHS))
PLANS = {p.name: p for p in (QUICK, DEFAULT, FULL)}


def make_plan(name: str, *, main_epochs: int | None = None,
              seeds: tuple[int, ...] | None = None) -> Plan:
  """A named plan, optionally with other main epochs or seeds.

  Args:
    name: ``'quick'``, ``'default'`` or ``'full'``.
    main_epochs: override of the main runs' epochs.
    seeds: seeds of the main runs.

  Returns:
    A :class:`Plan`.

  Raises:
    ValueError: an unknown name, non-positive epochs or no seeds.
  """
  if name not in PLANS:
    raise ValueError(f'plan must be one of {sorted(PLANS)}, got {name!r}.')
  plan = PLANS[name]
  if main_epochs is not None:
    if not isinstance(main_epochs, int) or main_epochs < 1:
      raise ValueError(f'main_epochs must be a positive int, got '
                       f'{main_epochs!r}.')
    plan = dataclasses.replace(plan, main=Part(main_epochs))
  if seeds is not None:
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
      raise ValueError('seeds must not be empty.')
    plan = dataclasses.replace(plan, seeds=seeds)
  return plan


@dataclasses.dataclass(frozen=True)
class DataOptions:
  """Data and batch settings shared by every run (tests shrink them).

  Attributes:
    data_dir: directory of MNIST IDX files.
    batch_size: training batch (paper: 256).
    eval_batch_size: evaluation batch.
    max_steps_per_epoch: cap on steps per epoch (``None``: the whole
      training set, 234 steps at batch 256).
    train_examples: training examples (to size the epochs).
  """
  data_dir: str = 'data/mnist'
  batch_size: int = 256
  eval_batch_size: int = 1000
  max_steps_per_epoch: int | None = None
  train_examples: int = MNIST_TRAIN

  @property
  def steps_per_epoch(self) -> int:
    steps = self.train_examples // self.batch_size
    if self.max_steps_per_epoch is not None:
      steps = min(steps, self.max_steps_per_epoch)
    if steps < 1:
      raise ValueError(f'{self.train_examples} training examples give no '
                       f'full batch of {self.batch_size}.')
    return steps


def make_config(*, part: Part, data: DataOptions, kind: str = 'adder',
                seed: int = 0, grad: str | None = None,
                scaling: str = 'adaptive', eta: float = 0.2,
                ilr_factor: float | None = None, model: str | None = None,
                recalibrate: bool = False) -> ml_collections.ConfigDict:
  """The train-loop config of one run of the reproduction.

  Args:
    part: epochs and evaluations per epoch.
    data: data and batch settings.
    kind: ``'cnn'``, ``'adder'`` or ``'bnn'``.
    seed: the run's seed (initialisation and data order).
    grad: adder gradient mode (``None``: the paper's full precision).
    scaling: ``'adaptive'`` (paper), ``'ilr'`` or ``'none'``.
    eta: adaptive-LR eta.
    ilr_factor: ILR multiplier (``scaling='ilr'``).
    model: ``'module:factory'`` (e.g. :data:`LENETPP`); default LeNet-5-BN.
    recalibrate: recompute the BatchNorm statistics from
      :data:`RECAL_BATCHES` training batches before every evaluation, and
      evaluate the intermediate points on :data:`CURVE_EVAL_EXAMPLES` test
      images when the run has more than one evaluation per epoch.

  Returns:
    A locked ``ml_collections.ConfigDict``.

  Examples:
    >>> c = make_config(part=Part(2, 4), data=DataOptions())
    >>> c.num_epochs, c.steps_per_epoch, c.batch_size, c.optimizer.momentum
    (8, 58, 256, 0.9)
  """
  c = lenet5_mnist.get_config(kind)
  spe = data.steps_per_epoch
  chunk = max(1, spe // part.evals_per_epoch)
  c.seed = int(seed)
  c.num_epochs = part.num_chunks
  c.steps_per_epoch = chunk if part.evals_per_epoch > 1 else (
      spe if data.max_steps_per_epoch is not None else -1)
  c.batch_size = data.batch_size
  c.eval_batch_size = data.eval_batch_size
  c.dataset.data_dir = data.data_dir
  c.dataset.prefetch = 2
  c.model.grad = grad
  if model is not None:
    c.model.name = model
    c.model.overrides = ml_collections.ConfigDict()
  c.optimizer.scaling = scaling
  c.optimizer.eta = float(eta)
  c.optimizer.ilr_factor = ilr_factor
  c.log_every_steps = max(1, math.ceil(spe / 12))
  c.eval_every_epochs = 1
  c.checkpoint_every_steps = c.num_epochs * chunk + 1  # only the final one
  c.max_to_keep = 1
  c.async_checkpointing = False
  c.progress_bar = False
  c.tensorboard = False
  if recalibrate:
    c.bn_recalibration_batches = RECAL_BATCHES
    if part.evals_per_epoch > 1:
      c.dataset.max_eval_examples = CURVE_EVAL_EXAMPLES
  c.lock()
  return c
