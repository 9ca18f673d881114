"""Tables and figure of the MNIST robustness runs (issue 30).

Reads the ``robustness.json`` files that ``python -m experiments.robustness
--out EVAL/<kind>[_adv]_s<seed>`` wrote, and writes ``table.md`` (mean and
spread over the seeds) and ``accuracy_vs_epsilon.png`` here.

Usage::

  python experiments/results/robustness/summarize.py EVAL_DIR
"""

import glob
import json
import os
import re
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = [('cnn', 'CNN'), ('adder', 'AddNN'), ('bnn', 'BNN'),
          ('cnn_adv', 'CNN-R'), ('adder_adv', 'AddNN-R'),
          ('bnn_adv', 'BNN-R')]
#: The same AdderNets attacked through the exact adder subgradient
#: (``--adder_grad sign``): not in the figure.
SIGN = [('adder_sign', 'AddNN, exact-gradient attack'),
        ('adder_adv_sign', 'AddNN-R, exact-gradient attack')]


def load(eval_dir):
  runs = {}
  for path in sorted(glob.glob(os.path.join(eval_dir, '*', 'robustness.json'))):
    name = os.path.basename(os.path.dirname(path))
    m = re.fullmatch(r'(.+)_s(\d+)(_sign)?', name)
    if m:
      runs.setdefault(m.group(1) + (m.group(3) or ''), {})[
          int(m.group(2))] = json.load(open(path))
  return runs


def cell(values):
  values = 100 * np.asarray(values)
  if len(values) == 1:
    return f'{values[0]:.2f}'
  return f'{values.mean():.2f} ± {values.std(ddof=1):.2f}'


def main(eval_dir):
  runs = load(eval_dir)
  epsilons = sorted({r['epsilon'] for seeds in runs.values()
                     for rep in seeds.values() for r in rep['results']})
  attacks = list(dict.fromkeys(r['attack'] for seeds in runs.values()
                               for rep in seeds.values()
                               for r in rep['results']))
  lines = []
  curves = {}
  for attack in attacks:
    lines += [f'**{attack.upper()}**' + (' (7 steps, step 2.5 eps / 7, random '
                                         'start)' if attack == 'pgd' else ''),
              '', '| model | seeds | clean | '
              + ' | '.join(f'eps {e:g}' for e in epsilons) + ' |',
              '|---|---|---|' + '---|' * len(epsilons)]
    for key, label in MODELS + SIGN:
      if key not in runs:
        continue
      reps = [runs[key][s] for s in sorted(runs[key])]
      row = [cell([r['clean_top1'] for r in reps])]
      means = []
      for e in epsilons:
        v = [next(x['top1'] for x in r['results']
                  if x['attack'] == attack and x['epsilon'] == e)
             for r in reps]
        row.append(cell(v))
        means.append(np.mean(v))
      curves[(attack, key)] = ([0.0] + epsilons,
                               [np.mean([r['clean_top1'] for r in reps])]
                               + means)
      seeds = ','.join(map(str, sorted(runs[key])))
      lines.append(f'| {label} | {seeds} | ' + ' | '.join(row) + ' |')
    lines.append('')
  count = {r['count'] for seeds in runs.values() for r in seeds.values()}
  text = (f'Top-1 accuracy (%) on the first {", ".join(map(str, count))} '
          'MNIST test images; mean ± sample std over the seeds listed.\n\n'
          + '\n'.join(lines))
  with open(os.path.join(HERE, 'table.md'), 'w') as f:
    f.write(text)
  with open(os.path.join(HERE, 'results.json'), 'w') as f:
    json.dump(runs, f, indent=1, sort_keys=True)
  print(text)

  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(attacks), figsize=(5 * len(attacks), 4),
                           sharey=True)
  axes = np.atleast_1d(axes)
  colors = {'cnn': 'C0', 'adder': 'C1', 'bnn': 'C2'}
  for ax, attack in zip(axes, attacks):
    for key, label in MODELS:
      if (attack, key) not in curves:
        continue
      xs, ys = curves[(attack, key)]
      ax.plot(xs, 100 * np.asarray(ys), marker='o', label=label,
              color=colors[key.split('_')[0]],
              linestyle='--' if key.endswith('_adv') else '-')
    ax.set_title(f'{attack.upper()} (white-box, l_inf)')
    ax.set_xlabel('epsilon (pixels in [0, 1])')
    ax.grid(alpha=0.3)
  axes[0].set_ylabel('top-1 accuracy (%)')
  axes[-1].legend()
  fig.suptitle('LeNet-5-BN on MNIST, 3 epochs; -R: adversarially trained '
               '(PGD-3, eps 0.3)')
  fig.tight_layout()
  fig.savefig(os.path.join(HERE, 'accuracy_vs_epsilon.png'), dpi=110)


if __name__ == '__main__':
  main(sys.argv[1])
