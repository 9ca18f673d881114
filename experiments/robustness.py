r"""White-box robustness of a trained run: ``python -m experiments.robustness``.

Reads the run's config from ``--workdir``, restores its newest (or
``--step``) checkpoint, and measures on the evaluation split the clean top-1
accuracy and the top-1 accuracy under each attack of ``--attacks`` at each
l_inf budget of ``--epsilons`` (pixel space, [0, 1]). The attacks are those of
:mod:`adderjax.attacks` (FGSM, PGD-k, BIM, MIM), white-box: the gradient flows
through the model's normalisation, with the model in evaluation mode
(BatchNorm on its running statistics; recalibrated first if the run's
``bn_recalibration_batches`` says so, as its evaluation does). Adversarial
examples stay within the budget around the image and within [0, 1].

``--steps`` and ``--step_size`` set the iterative attacks (PGD, BIM, MIM;
step size default: PGD ``2.5 * epsilon / steps``, BIM and MIM
``epsilon / steps``); ``--random_start`` (default on) starts PGD at a uniform
point of the ball, drawn from ``--seed`` and the batch's position in the
split. ``--max_examples`` evaluates the
first N examples only. ``--adder_grad`` chooses the adder layers' input
gradient the attacks follow (the run's by default: the paper's full-precision
HardTanh surrogate; ``sign`` is the exact subgradient), to tell real
robustness from a masked gradient.

Writes ``robustness.json`` (every figure, the options, the command) and
``robustness.md`` (a table: attacks by rows, epsilons by columns) in the
workdir, or in ``--out``. Expected errors print one line and exit 2.

Example::

  python -m experiments.robustness --workdir workdirs/lenet5_mnist \
      --attacks fgsm,pgd --epsilons 0.1,0.2,0.3 --max_examples 1000
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from adderjax import attacks
from experiments import adversarial
from experiments import cli
from experiments import errors
from experiments import experiment
from experiments import losses
from experiments import parallel
from experiments import steps
from experiments import train

JSON_FILE = 'robustness.json'
MD_FILE = 'robustness.md'


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines this program's flags on ``flag_values``."""
  flags.DEFINE_string('workdir', None, 'Run directory (a trained run).',
                      flag_values=flag_values)
  cli.define_list('attacks', ['fgsm', 'pgd'], 'Attacks, of '
                  f'{",".join(attacks.ATTACKS)}.', flag_values)
  cli.define_list('epsilons', [0.05, 0.1, 0.2, 0.3],
                  'l_inf budgets in pixel space ([0, 1]).', flag_values,
                  item=float)
  flags.DEFINE_integer('steps', 7, 'Iterations of PGD, BIM and MIM.',
                       flag_values=flag_values)
  flags.DEFINE_float('step_size', None, 'Step of PGD, BIM and MIM (default: '
                     'PGD 2.5 * epsilon / steps, BIM and MIM epsilon / '
                     'steps).', flag_values=flag_values)
  flags.DEFINE_bool('random_start', True, 'PGD starts at a uniform random '
                    'point of the epsilon ball.', flag_values=flag_values)
  flags.DEFINE_integer('seed', 0, 'Seed of the random starts.',
                       flag_values=flag_values)
  flags.DEFINE_integer('max_examples', None, 'Evaluate the first N examples '
                       'of the split only (default: all).',
                       flag_values=flag_values)
  flags.DEFINE_string('out', None, 'Directory of robustness.json / .md '
                      '(default: the workdir).', flag_values=flag_values)
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: last).',
                       flag_values=flag_values)
  flags.DEFINE_string('data_dir', None,
                      'Override dataset.data_dir (MNIST files).',
                      flag_values=flag_values)
  flags.DEFINE_string('split', None, 'Override dataset.eval_split.',
                      flag_values=flag_values)
  flags.DEFINE_integer('eval_batch_size', None, 'Override eval_batch_size.',
                       flag_values=flag_values)
  flags.DEFINE_enum('adder_grad', None, ['full_precision', 'sign',
                                         'unclipped'],
                    'Override model.grad, the input gradient of the adder '
                    'layers the attacks follow (default: the run\'s, the '
                    'paper\'s full-precision HardTanh surrogate; sign: the '
                    'exact subgradient). The weights are the same.',
                    flag_values=flag_values)
  flags.DEFINE_bool('progress_bar', True, 'Show a progress bar.',
                    flag_values=flag_values)
  flags.DEFINE_bool('trust_workdir_code', False,
                    'Allow the workdir\'s config.json to name a model '
                    '"module:factory" (imports and runs that module).',
                    flag_values=flag_values)
  flags.mark_flag_as_required('workdir', flag_values=flag_values)


# ----------------------------------------------------------------------------
# The evaluation.


def check_options(names, epsilons, steps_, step_size) -> None:
  """Raises a UsageError naming a bad flag value.

  Examples:
    >>> check_options(['pgd'], [0.1], 7, None)
    >>> check_options(['pgd', 'cw'], [0.1], 7, None)
    Traceback (most recent call last):
    ...
    experiments.errors.UsageError: --attacks: 'cw' is not an attack; use fgsm, pgd, bim, mim.
  """
  if not names:
    raise errors.UsageError('--attacks is empty.')
  for name in names:
    if name not in attacks.ATTACKS:
      raise errors.UsageError(f'--attacks: {name!r} is not an attack; use '
                              f'{", ".join(attacks.ATTACKS)}.')
  if not epsilons:
    raise errors.UsageError('--epsilons is empty.')
  for eps in epsilons:
    if not np.isfinite(eps) or eps < 0:
      raise errors.UsageError(f'--epsilons: {eps!r} is not a finite number '
                              '>= 0.')
  if steps_ < 1:
    raise errors.UsageError(f'--steps must be >= 1, got {steps_}.')
  if step_size is not None and (not np.isfinite(step_size) or step_size <= 0):
    raise errors.UsageError(f'--step_size must be a finite number > 0, got '
                            f'{step_size}.')


def make_attack_eval_step(apply_fn: Callable, mean, std, dtype,
                          axis_name: str | None, name: str, epsilon: float,
                          options: dict[str, Any], seed: int) -> Callable:
  """``(state, batch) -> masked metric sums`` of the attacked batch.

  ``batch`` carries ``image``, ``label``, ``mask`` and ``index`` (the
  examples' positions in the split: the random start's key is
  ``fold_in(key(seed), index of the batch's first row)``).
  """
  def step(state, batch):
    pixels = batch['image'].astype(jnp.float32) / 255.0
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    loss_fn = adversarial.attack_loss(apply_fn, variables, mean, std, dtype)
    key = jax.random.fold_in(jax.random.key(seed, impl=steps.PRNG_IMPL),
                             batch['index'][0])
    x_adv = attacks.attack(name, loss_fn, pixels, batch['label'], epsilon,
                           key=key, **options)
    logits = apply_fn(variables, adversarial.standardize(x_adv, mean, std,
                                                         dtype),
                      train=False, mutable=False)
    return parallel.axis_sum(
        losses.classification_metrics(logits, batch['label'], batch['mask']),
        axis_name)
  return step


def _batches(exp, max_examples: int | None):
  """``(batches, n, num_batches)``: a function giving the eval batches
  (with ``index``; the mask cut at ``n``), the number of examples ``n``,
  the number of batches."""
  stream = exp.datasets.eval
  n = stream.num_examples
  if max_examples is not None:
    n = min(n, max_examples)
  b = stream.global_batch_size
  num_batches = -(-n // b)

  def batches():
    for i, batch in enumerate(stream):
      if i >= num_batches:
        return
      index = np.arange(i * b, (i + 1) * b, dtype=np.int32)[stream.rows]
      yield dict(batch, index=index, mask=batch['mask'] & (index < n))
  return batches, n, num_batches


def _load(config, workdir: str, step: int | None):
  """``(exp, state, step)``: the run's experiment and restored state."""
  exp, host_state, step = train.restore_checkpoint(config, workdir, step)
  state = exp.runner.put_state(host_state)
  if exp.config.bn_recalibration_batches > 0:
    state = exp.recalibrate_batch_stats(state)
  return exp, state, step


def evaluate_robustness(config, workdir: str, *, names=('fgsm', 'pgd'),
                        epsilons=(0.05, 0.1, 0.2, 0.3), steps_: int = 7,
                        step_size: float | None = None,
                        random_start: bool = True, seed: int = 0,
                        max_examples: int | None = None, step=None,
                        progress_bar: bool = True) -> dict[str, Any]:
  """Clean and attacked top-1 accuracy of a run's checkpoint.

  Returns:
    ``{'step', 'count', 'clean_top1', 'results': [{'attack', 'epsilon',
    'top1', 'loss', ...options}], ...}``.

  Raises:
    experiments.errors.UserError: a bad option, no run, no checkpoint.
  """
  check_options(names, epsilons, steps_, step_size)
  if max_examples is not None and max_examples < 1:
    raise errors.UsageError(f'--max_examples must be >= 1, got '
                            f'{max_examples}.')
  exp, state, step = _load(config, workdir, step)
  batches, _, num_batches = _batches(exp, max_examples)
  b = exp.config.eval_batch_size
  runs = [(name, float(eps)) for name in names for eps in epsilons]
  bar = None
  if progress_bar:
    bar = tqdm.tqdm(total=(len(runs) + 1) * num_batches, unit='batch',
                    desc='robustness', dynamic_ncols=True)

  def measure(step_fn, label):
    compiled = exp.runner.compile_eval(step_fn)
    totals = None
    for batch in batches():
      m = compiled(state, exp.put_batch(batch, b))
      totals = m if totals is None else jax.tree.map(jnp.add, totals, m)
      if bar is not None:
        bar.set_postfix_str(label)
        bar.update(1)
    host = exp.runner.get_metrics(totals)
    n = float(host['count'])
    return {'top1': float(host['top1']) / n, 'loss': float(host['loss']) / n,
            'count': n}

  started = time.time()
  clean = measure(_clean_step(exp), 'clean')
  results = []
  for name, eps in runs:
    options = {'steps': steps_, 'step_size': step_size,
               'random_start': random_start}
    r = measure(make_attack_eval_step(
        exp.model.apply, exp.mean, exp.std, exp.dtype, exp.runner.axis_name,
        name, eps, options, seed), f'{name} eps={eps:g}')
    entry = {'attack': name, 'epsilon': eps, 'top1': r['top1'],
             'loss': r['loss']}
    if name != 'fgsm':
      entry.update(steps=steps_, step_size=_step_size(name, eps, steps_,
                                                      step_size))
      if name == 'pgd':
        entry['random_start'] = random_start
    results.append(entry)
  if bar is not None:
    bar.close()
  return {'workdir': os.path.abspath(workdir), 'step': step,
          'model': exp.config.model.name, 'kind': exp.config.model.kind,
          'method': exp.config.method, 'grad': exp.config.model.grad,
          'dataset': exp.config.dataset.name,
          'split': exp.config.dataset.eval_split, 'count': int(clean['count']),
          'clean_top1': clean['top1'], 'clean_loss': clean['loss'],
          'seed': seed, 'results': results,
          'seconds': round(time.time() - started, 1)}


def _clean_step(exp) -> Callable:
  """The clean accuracy on pixel-space inputs (the attacks' own path)."""
  def step(state, batch):
    pixels = batch['image'].astype(jnp.float32) / 255.0
    logits = exp.model.apply(
        {'params': state.params, 'batch_stats': state.batch_stats},
        adversarial.standardize(pixels, exp.mean, exp.std, exp.dtype),
        train=False, mutable=False)
    return parallel.axis_sum(
        losses.classification_metrics(logits, batch['label'], batch['mask']),
        exp.runner.axis_name)
  return step


def _step_size(name, eps, steps_, step_size):
  if step_size is not None:
    return step_size
  return (2.5 if name == 'pgd' else 1.0) * eps / steps_


def markdown(report: dict[str, Any]) -> str:
  """The report as a markdown table (top-1 %, attacks x epsilons).

  Examples:
    >>> print(markdown({'workdir': 'w', 'step': 3, 'model': 'lenet5_bn',
    ...     'kind': 'adder', 'method': 'supervised', 'dataset': 'mnist',
    ...     'split': 'test', 'count': 10, 'clean_top1': 0.9,
    ...     'results': [{'attack': 'fgsm', 'epsilon': 0.1, 'top1': 0.5}]}))
    ... # doctest: +NORMALIZE_WHITESPACE
    # Robustness of w (step 3)
    <BLANKLINE>
    lenet5_bn (adder, supervised), mnist test, 10 examples; top-1 accuracy (%) under white-box l_inf attacks, epsilon in pixels ([0, 1]).
    <BLANKLINE>
    | attack | clean | 0.1 |
    |---|---|---|
    | fgsm | 90.00 | 50.00 |
  """
  epsilons = sorted({r['epsilon'] for r in report['results']})
  lines = [f"# Robustness of {report['workdir']} (step {report['step']})", '',
           f"{report['model']} ({report['kind']}, {report['method']}), "
           f"{report['dataset']} {report['split']}, {report['count']} "
           'examples; top-1 accuracy (%) under white-box l_inf attacks, '
           'epsilon in pixels ([0, 1])'
           + (f"; adder input gradient {report['grad']!r}"
              if report.get('grad') else '') + '.', '',
           '| attack | clean | ' + ' | '.join(f'{e:g}' for e in epsilons)
           + ' |', '|---|---|' + '---|' * len(epsilons)]
  names = list(dict.fromkeys(r['attack'] for r in report['results']))
  for name in names:
    row = {r['epsilon']: r['top1'] for r in report['results']
           if r['attack'] == name}
    cells = [f'{100 * row[e]:.2f}' if e in row else '' for e in epsilons]
    lines.append(f"| {name} | {100 * report['clean_top1']:.2f} | "
                 + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def main(flag_values: flags.FlagValues, args: list[str]) -> None:
  """Evaluates the robustness of ``--workdir`` and writes the report."""
  cli.no_arguments(args)
  out = flag_values.out or flag_values.workdir
  cli.check_workdir(out, '--out' if flag_values.out else '--workdir')
  check_options(flag_values.attacks, flag_values.epsilons, flag_values.steps,
                flag_values.step_size)
  config = experiment.load_run_config(
      flag_values.workdir, trust_code=flag_values.trust_workdir_code)
  for flag, key in (('data_dir', 'dataset.data_dir'),
                    ('split', 'dataset.eval_split'),
                    ('eval_batch_size', 'eval_batch_size'),
                    ('adder_grad', 'model.grad')):
    value = flag_values[flag].value
    if value is not None:
      section, _, leaf = key.rpartition('.')
      (config[section] if section else config)[leaf] = value
  report = evaluate_robustness(
      config, flag_values.workdir, names=tuple(flag_values.attacks),
      epsilons=tuple(flag_values.epsilons), steps_=flag_values.steps,
      step_size=flag_values.step_size,
      random_start=flag_values.random_start, seed=flag_values.seed,
      max_examples=flag_values.max_examples, step=flag_values.step,
      progress_bar=flag_values.progress_bar)
  report['command'] = cli.command_line('experiments.robustness', flag_values)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, JSON_FILE), 'w') as f:
    json.dump(report, f, indent=2)
  text = markdown(report)
  with open(os.path.join(out, MD_FILE), 'w') as f:
    f.write(text)
  print(text, end='')


if __name__ == '__main__':
  cli.run(main, define_flags)
