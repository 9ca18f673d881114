"""Train-step speed and memory of AddNN vs CNN models of the zoo.

``python -m experiments.benchmarks.models`` times one SGD train step (forward,
backward, :func:`adderjax.optim.addernet_sgd` update: momentum 0.9 and weight decay
for both kinds, plus the paper's adaptive learning rate on the AddNN's adder
kernels; BatchNorm in train mode) of the
adder and the CNN version of LeNet-5-BN, ResNet-20 and VGG-small
(:func:`adderjax.models.create_model`), in float32 and bfloat16 compute, and
prints median step time, images/s, compile time and peak memory (XLA buffer
assignment), with the AddNN/CNN ratios. The two kinds of one model are timed
interleaved in one process (see :mod:`experiments.benchmarks.common`).

Examples:
  python -m experiments.benchmarks.models
  python -m experiments.benchmarks.models --models resnet20 --batches 64 128
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from adderjax import models
from adderjax import optim
from experiments import cli
from experiments.benchmarks import common


@dataclasses.dataclass(frozen=True)
class ModelCase:
  model: str
  batch: int
  dtype: str = 'float32'

  @property
  def label(self) -> str:
    return f'{self.model} b{self.batch} {self.dtype}'


def make_train_step(model_name: str, kind: str, batch: int, dtype: str,
                    num_classes: int = 10, seed: int = 0):
  """A jittable train step and its arguments for one model kind.

  Returns:
    ``(step, args)`` with ``step(params, batch_stats, opt_state, x, y) ->
    (params, batch_stats, opt_state, loss)``.
  """
  model = models.create_model(model_name, kind=kind, num_classes=num_classes,
                              dtype=jnp.dtype(dtype))
  h, w, c = models.INPUT_SHAPES[model_name]
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch, h, w, c)), jnp.float32)
  y = jnp.asarray(rng.integers(0, num_classes, size=(batch,)), jnp.int32)
  variables = jax.jit(lambda k, x: model.init(k, x, train=False))(
      jax.random.key(seed), x)
  params, batch_stats = variables['params'], variables['batch_stats']
  if kind == 'adder':
    # The paper's optimiser: eq. 13's adaptive learning rate on the adder
    # kernels, then the SGD + momentum + weight decay the CNN also gets.
    mask = optim.adder_mask(model, x, train=False)
    tx = optim.addernet_sgd(0.1, mask=mask)
  else:
    tx = optim.addernet_sgd(0.1, scaling='none')
  opt_state = tx.init(params)

  def step(params, batch_stats, opt_state, x, y):
    def loss_fn(p):
      logits, updates = model.apply({'params': p, 'batch_stats': batch_stats},
                                    x, train=True, mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return jnp.mean(loss), updates['batch_stats']
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  return step, (params, batch_stats, opt_state, x, y)


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


def default_cases(quick: bool = False) -> list[ModelCase]:
  cases = [ModelCase('lenet5_bn', 256), ModelCase('resnet20', 64),
           ModelCase('resnet20', 128)]
  if not quick:
    cases += [ModelCase('vgg_small', 32)]
  cases += [ModelCase('lenet5_bn', 256, 'bfloat16'),
            ModelCase('resnet20', 64, 'bfloat16')]
  return cases


def run_suite(cases: Sequence[ModelCase], *, repeats: int,
              verbose: bool = True) -> list[ModelResult]:
  results = []
  for case in cases:
    r = bench_model(case, repeats=repeats)
    if verbose:
      print(f'  {case.label}: CNN {common.fmt_ms(r.t("cnn"))} ms, AddNN '
            f'{common.fmt_ms(r.t("adder"))} ms', flush=True)
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
  results = run_suite(cases, repeats=3 if fv.quick else fv.repeats)
  print()
  print('## Train step (forward + backward + SGD momentum/weight decay '
        '(+ adaptive LR for AddNN), BN train mode)\n')
  print(report(results))
  print(common.machine_line())


if __name__ == '__main__':
  cli.run(main, define_flags)
