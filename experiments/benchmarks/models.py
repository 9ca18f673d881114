"""Train-step speed and memory of AddNN vs CNN models of the zoo.

``python -m experiments.benchmarks.models`` times the experiments' train step
(:class:`experiments.experiment.Experiment` of each model's config: forward,
backward, :func:`adderjax.optim.addernet_sgd` update with momentum 0.9 and
weight decay for both kinds, plus the paper's adaptive learning rate on the
AddNN's adder kernels; BatchNorm in train mode) of the
adder and the CNN version of LeNet-5-BN, ResNet-20 and VGG-small, in float32 and bfloat16 compute, and
prints median step time, images/s, compile time and peak memory (XLA buffer
assignment), with the AddNN/CNN ratios. The two kinds of one model are timed
interleaved in one process (see :mod:`experiments.benchmarks.common`).

``--pkkd`` adds the joint PKKD step (:mod:`experiments.distillation`: the
AddNN student, its CNN twin as teacher and the kernel feature maps, one
step) and a second table of its cost against the plain AddNN step.

Examples:
  python -m experiments.benchmarks.models
  python -m experiments.benchmarks.models --models resnet20 --batches 64 128
  python -m experiments.benchmarks.models --models lenet5_bn --pkkd
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from experiments import experiment
from experiments.benchmarks import common
from experiments.configs import lenet5_mnist
from experiments.configs import resnet18_imagenet
from experiments.configs import resnet20_cifar10
from experiments.configs import resnet32_cifar10
from experiments.configs import resnet50_imagenet
from experiments.configs import vgg_small_cifar10


@dataclasses.dataclass(frozen=True)
class ModelCase:
  model: str
  batch: int
  dtype: str = 'float32'

  @property
  def label(self) -> str:
    return f'{self.model} b{self.batch} {self.dtype}'


#: The experiment config of each zoo model (its dataset's shapes).
CONFIGS = {'lenet5_bn': lenet5_mnist, 'resnet20': resnet20_cifar10,
           'resnet32': resnet32_cifar10, 'vgg_small': vgg_small_cifar10,
           'resnet18': resnet18_imagenet, 'resnet50': resnet50_imagenet}


def make_train_step(model_name: str, kind: str, batch: int, dtype: str,
                    seed: int = 0):
  """The experiments' train step of one model kind, and its arguments.

  The step is the one :func:`experiments.train.train_and_evaluate` runs
  (:class:`experiments.experiment.Experiment` of the model's config: the
  paper's optimizer with the adaptive learning rate on the adder kernels,
  the CNN without it; BatchNorm in train mode; ``uint8`` images normalised in
  the step), on one device, uncompiled.

  Args:
    model_name: a key of :data:`CONFIGS`.
    kind: the config argument: a kind (``'cnn'``, ``'adder'``), optionally
      with a method token (``'adder,pkkd'``).
    batch: the global batch size.
    dtype: the compute dtype.
    seed: the initialisation seed.

  Returns:
    ``(step, args)`` with ``step(state, batch) -> (state, metric sums)``.

  Raises:
    ValueError: a model without an experiment config.
  """
  if model_name not in CONFIGS:
    raise ValueError(f'model {model_name!r}: use one of {sorted(CONFIGS)}.')
  config = CONFIGS[model_name].get_config(kind)
  config.batch_size = batch
  config.model.dtype = dtype
  config.parallelism = 'jit'
  config.seed = seed
  exp = experiment.Experiment.from_config(config, devices=jax.devices()[:1],
                                          data=False)
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch,) + exp.image_shape, dtype=np.uint8)
  labels = rng.integers(0, exp.num_classes, (batch,), dtype=np.int32)
  state = jax.tree.map(jnp.asarray, exp.init_host_state())
  return exp.train_step_fn(), (state, {'image': jnp.asarray(images),
                                       'label': jnp.asarray(labels)})


@dataclasses.dataclass
class ModelResult:
  case: ModelCase
  cands: dict[str, common.Candidate]

  def t(self, kind: str) -> float:
    c = self.cands.get(kind)
    return c.median_s if c is not None else math.nan


def bench_model(case: ModelCase, *, repeats: int,
                kinds: Sequence[str] = ('cnn', 'adder')) -> ModelResult:
  cands = []
  for kind in kinds:
    step, args = make_train_step(case.model, kind, case.batch, case.dtype)
    cands.append(common.Candidate(kind, step, args))
  common.run_group(cands, repeats=repeats, warmup=2, min_time=0.05)
  return ModelResult(case, {c.name: c for c in cands})


def report(results: Sequence[ModelResult]) -> str:
  rows = []
  for r in results:
    cnn, add = r.cands.get('cnn'), r.cands.get('adder')
    if cnn is None or add is None:
      continue
    b = r.case.batch
    rows.append([
        r.case.label,
        common.fmt_ms(cnn.median_s), common.fmt_ms(add.median_s),
        common.fmt_ratio(add.median_s, cnn.median_s),
        f'{b / cnn.median_s:.0f}' if cnn.times else '-',
        f'{b / add.median_s:.0f}' if add.times else '-',
        f'{cnn.compile_s:.1f}', f'{add.compile_s:.1f}',
        common.fmt_mb(cnn.peak_bytes), common.fmt_mb(add.peak_bytes),
        common.fmt_ratio(add.peak_bytes, cnn.peak_bytes),
    ])
  text = common.table(
      ['model', 'CNN step ms', 'AddNN step ms', 'AddNN/CNN', 'CNN img/s',
       'AddNN img/s', 'CNN compile s', 'AddNN compile s', 'CNN MB',
       'AddNN MB', 'AddNN/CNN MB'], rows)
  errors = [f'  {r.case.label} {c.name}: {c.error}'
            for r in results for c in r.cands.values() if c.error]
  if errors:
    text += '\n\nerrors:\n' + '\n'.join(errors)
  return text + '\n'


def report_pkkd(results: Sequence[ModelResult]) -> str:
  """The joint PKKD step against the plain AddNN step (``--pkkd``)."""
  rows = []
  for r in results:
    add, pk = r.cands.get('adder'), r.cands.get(PKKD)
    if add is None or pk is None:
      continue
    rows.append([
        r.case.label, common.fmt_ms(add.median_s), common.fmt_ms(pk.median_s),
        common.fmt_ratio(pk.median_s, add.median_s),
        f'{pk.compile_s:.1f}', common.fmt_mb(add.peak_bytes),
        common.fmt_mb(pk.peak_bytes),
        common.fmt_ratio(pk.peak_bytes, add.peak_bytes)])
  return common.table(
      ['model', 'AddNN step ms', 'PKKD step ms', 'PKKD/AddNN',
       'PKKD compile s', 'AddNN MB', 'PKKD MB', 'PKKD/AddNN MB'],
      rows) + '\n'


def default_cases(quick: bool = False) -> list[ModelCase]:
  cases = [ModelCase('lenet5_bn', 256), ModelCase('resnet20', 64),
           ModelCase('resnet20', 128)]
  if not quick:
    cases += [ModelCase('vgg_small', 32)]
  cases += [ModelCase('lenet5_bn', 256, 'bfloat16'),
            ModelCase('resnet20', 64, 'bfloat16')]
  return cases


#: The candidate name of the joint PKKD step (a config argument).
PKKD = 'adder,pkkd'


def run_suite(cases: Sequence[ModelCase], *, repeats: int,
              verbose: bool = True, pkkd: bool = False) -> list[ModelResult]:
  results = []
  kinds = ('cnn', 'adder') + ((PKKD,) if pkkd else ())
  for case in cases:
    r = bench_model(case, repeats=repeats, kinds=kinds)
    if verbose:
      print(f'  {case.label}: CNN {common.fmt_ms(r.t("cnn"))} ms, AddNN '
            f'{common.fmt_ms(r.t("adder"))} ms' +
            (f', PKKD {common.fmt_ms(r.t(PKKD))} ms' if pkkd else ''),
            flush=True)
    results.append(r)
  return results


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines this program's flags on ``flag_values``."""
  fv = flag_values
  cli.define_list('models', None, 'Subset of the model names (default: '
                  'all).', fv)
  cli.define_list('batches', None, 'Batch sizes (default: each case\'s).',
                  fv, item=int)
  cli.define_list('dtypes', None, 'Compute dtypes (default: each case\'s).',
                  fv)
  flags.DEFINE_integer('repeats', 7, 'Timed rounds (median).', lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_bool('quick', False, 'Fewer cases, 3 repeats.',
                    flag_values=fv)
  flags.DEFINE_bool('pkkd', False, 'Also time the joint PKKD step (AddNN '
                    'student + CNN teacher) against the AddNN step.',
                    flag_values=fv)


def main(flag_values: flags.FlagValues, args: list[str]) -> None:
  """Times the train steps and prints the table."""
  cli.no_arguments(args)
  fv = flag_values
  cases = default_cases(fv.quick)
  if fv.models:
    cases = [c for c in cases if c.model in fv.models]
  if fv.batches:
    cases = [dataclasses.replace(c, batch=b) for c in cases
             for b in fv.batches]
    cases = list(dict.fromkeys(cases))
  if fv.dtypes:
    cases = list(dict.fromkeys(dataclasses.replace(c, dtype=d)
                               for c in cases for d in fv.dtypes))
  print(common.machine_line(), flush=True)
  results = run_suite(cases, repeats=3 if fv.quick else fv.repeats,
                      pkkd=fv.pkkd)
  print()
  print('## Train step (forward + backward + SGD momentum/weight decay '
        '(+ adaptive LR for AddNN), BN train mode)\n')
  print(report(results))
  if fv.pkkd:
    print('## PKKD joint step (student + CNN teacher + kernel maps) vs the '
          'AddNN step\n')
    print(report_pkkd(results))
  print(common.machine_line())


if __name__ == '__main__':
  cli.run(main, define_flags)
