"""Effective rank of the ViT's attention maps, with and without the fix.

For each finished run ``RUNS/<variant>_s<seed>`` of ``vit_mnist.py`` (and,
for seed 0, its freshly initialised model), runs the first
``--images`` test images through the model in evaluation mode, takes every
block's attention maps (:func:`adderjax.linen.attention_maps`) and their
entropy effective rank (:func:`adderjax.attention.effective_rank`), averaged
over images and heads. Two ranks per block:

* ``applied``: the map the block multiplies the values with (for
  ``identity='output'`` that is ``(A + lambda I) / (1 + lambda)``);
* ``softmax``: the softmax part ``A`` alone (the same map for the other
  variants), i.e. what the scores themselves give.

Writes ``rank.json`` and ``rank.png`` here (``--out`` elsewhere).

Usage::

  python experiments/results/vit/attention_rank.py RUNS [--images 256]
"""

import argparse
import glob
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from adderjax import attention
from adderjax import linen as adder_linen
from experiments import experiment
from experiments import train

HERE = os.path.dirname(os.path.abspath(__file__))
#: Variants in the order of the table and figure: directory prefix, label.
VARIANTS = [('cnn', 'CNN ViT (dot)'),
            ('adder_dot', 'adder-linear ViT (dot)'),
            ('adder_noid', 'adder ViT, l1, no identity'),
            ('adder', 'adder ViT, l1 + identity (output)'),
            ('adder_idlogits', 'adder ViT, l1 + identity (logits)')]


def _images(exp, n):
  """The first ``n`` standardised test images of the run's eval stream."""
  out = []
  for batch in exp.datasets.eval:
    out.append(np.asarray(batch['image'], np.float32))
    if sum(len(b) for b in out) >= n:
      break
  pixels = np.concatenate(out)[:n] / 255.0
  return ((pixels - np.asarray(exp.mean)) / np.asarray(exp.std)).astype(
      np.float32)


def ranks(model, variables, x, identity, weight):
  """``{block: (applied rank, softmax rank)}`` means over images, heads."""
  maps = adder_linen.attention_maps(model, variables, x, train=False)
  out = {}
  for name, m in sorted(maps.items()):
    m = jnp.asarray(m, jnp.float32)
    soft = m * (1 + weight) - weight * jnp.eye(m.shape[-1]) if (
        identity == 'output') else m
    out[name] = (float(attention.effective_rank(m).mean()),
                 float(attention.effective_rank(soft).mean()))
  return out


def measure(workdir, n_images, init):
  config = experiment.load_run_config(workdir)
  exp, host_state, _ = train.restore_checkpoint(config, workdir)
  x = jnp.asarray(_images(exp, n_images))
  fields = exp.model
  identity = getattr(fields, 'identity', 'none')
  if fields.scores() != 'l1':
    identity = 'none'
  weight = getattr(fields, 'identity_weight', 0.0)
  state = exp.init_host_state() if init else host_state
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  return ranks(exp.model, variables, x, identity, weight)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('runs')
  parser.add_argument('--images', type=int, default=256)
  parser.add_argument('--out', default=HERE)
  parser.add_argument('--plot_only', action='store_true',
                      help='redraw rank.png from OUT/rank.json')
  args = parser.parse_args()
  if args.plot_only:
    with open(os.path.join(args.out, 'rank.json')) as f:
      plot(json.load(f), os.path.join(args.out, 'rank.png'))
    return
  results = {}
  for prefix, _ in VARIANTS:
    for path in sorted(glob.glob(os.path.join(args.runs, prefix + '_s*'))):
      if not re.fullmatch(re.escape(prefix) + r'_s\d+',
                          os.path.basename(path)):
        continue
      summary = os.path.join(path, 'summary.json')
      if not (os.path.exists(summary) and json.load(open(summary))['finished']):
        continue  # a run still training
      # The initial maps of seed 0 only (the other seeds' are alike).
      for init in ((True, False) if path.endswith('_s0') else (False,)):
        key = f'{os.path.basename(path)}{"@init" if init else ""}'
        results[key] = measure(path, args.images, init)
        print(key, results[key], flush=True)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'rank.json'), 'w') as f:
    json.dump(results, f, indent=1, sort_keys=True)
  plot(results, os.path.join(args.out, 'rank.png'))


def plot(results, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 5), sharey=True)
  for ax, which, title in ((axes[0], 0, 'map applied to the values'),
                           (axes[1], 1, 'softmax part A')):
    for prefix, label in VARIANTS:
      for stage, style in (('', '-o'), ('@init', ':')):
        runs = [v for k, v in results.items()
                if re.fullmatch(re.escape(prefix) + r'_s\d+' +
                                re.escape(stage), k)]
        if not runs:
          continue
        blocks = sorted(runs[0])
        mean = np.mean([[r[b][which] for b in blocks] for r in runs], 0)
        ax.plot(range(len(blocks)), mean, style,
                label=label + (' (init)' if stage else ''),
                color=f'C{[p for p, _ in VARIANTS].index(prefix)}')
    ax.set_title(title)
    ax.set_xlabel('block')
    ax.set_xticks(range(len(blocks)))
    ax.grid(alpha=0.3)
  axes[0].set_ylabel('effective rank (of 16 tokens)')
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc='lower center', ncol=3, fontsize=7)
  fig.tight_layout(rect=(0, 0.2, 1, 1))
  fig.savefig(path, dpi=120)


if __name__ == '__main__':
  main()
