"""The MNIST ViT table (issue 31) from the runs' ``summary.json`` files.

Reads ``RUNS/<variant>_s<seed>/summary.json`` (runs of
``experiments/configs/vit_mnist.py``, named as in
:data:`attention_rank.VARIANTS`), copies each summary to ``summaries/`` here
and writes ``table.md``: test top-1 per seed, mean and sample standard
deviation. (The runs' throughput is in the summaries; it is not compared:
the runs shared 2 CPU cores with other jobs.)

Usage::

  python experiments/results/vit/summarize.py RUNS
"""

import json
import os
import re
import shutil
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from attention_rank import VARIANTS  # pylint: disable=g-import-not-at-top,wrong-import-position


def load(runs_dir):
  runs = {}
  for name in sorted(os.listdir(runs_dir)):
    path = os.path.join(runs_dir, name, 'summary.json')
    m = re.fullmatch(r'(.+)_s(\d+)', name)
    if m and os.path.exists(path):
      summary = json.load(open(path))
      if summary.get('finished'):
        runs.setdefault(m.group(1), {})[int(m.group(2))] = summary
  return runs


def table(runs):
  seeds = sorted({s for r in runs.values() for s in r})
  lines = ['| model | ' + ' | '.join(f'seed {s}' for s in seeds) +
           ' | mean ± std |',
           '|---|' + '---|' * len(seeds) + '---|']
  for prefix, label in VARIANTS:
    if prefix not in runs:
      continue
    r = runs[prefix]
    top1 = [100 * r[s]['eval']['top1'] for s in seeds if s in r]
    cells = [f'{100 * r[s]["eval"]["top1"]:.2f}' if s in r else '–'
             for s in seeds]
    mean = (f'{np.mean(top1):.2f} ± {np.std(top1, ddof=1):.2f}'
            if len(top1) > 1 else f'{top1[0]:.2f} (n=1)')
    lines.append(f'| {label} | ' + ' | '.join(cells) + f' | {mean} |')
  return '\n'.join(lines) + '\n'


def main(runs_dir):
  runs = load(runs_dir)
  os.makedirs(os.path.join(HERE, 'summaries'), exist_ok=True)
  for prefix, seeds in runs.items():
    for seed in seeds:
      shutil.copy(os.path.join(runs_dir, f'{prefix}_s{seed}', 'summary.json'),
                  os.path.join(HERE, 'summaries', f'{prefix}_s{seed}.json'))
  text = table(runs)
  with open(os.path.join(HERE, 'table.md'), 'w') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  main(sys.argv[1])
