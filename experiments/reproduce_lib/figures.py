"""The reproduction's figures (matplotlib, Agg backend, PNG files).

Every function takes plain numbers / numpy arrays and writes one PNG; none
trains anything. Class colours are matplotlib's ``tab10`` (one per digit).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

KIND_LABELS = {'cnn': 'CNN', 'adder': 'AddNN', 'bnn': 'BNN'}
KIND_COLOURS = {'cnn': 'tab:blue', 'adder': 'tab:red', 'bnn': 'tab:green'}
SCALING_COLOURS = {'adaptive': 'tab:red', 'ilr': 'tab:orange',
                   'none': 'tab:gray'}
GRAD_STYLES = {'full_precision': '-', 'sign': '--'}
DPI = 130


def _save(fig, path: str) -> str:
  fig.savefig(path, dpi=DPI, bbox_inches='tight')
  plt.close(fig)
  return path


def _curve(points, index):
  if not points:
    return np.zeros(0), np.zeros(0)
  arr = np.asarray(points, np.float64)
  return arr[:, 0], arr[:, index]


def plot_learning_curves(runs: Sequence[dict[str, Any]], path: str, *,
                         title: str, eval_label: str = 'test',
                         zoom: bool = True) -> str:
  """Training loss and test accuracy against epochs for several runs.

  Args:
    runs: dicts with ``label``, ``train_curve`` and ``eval_curve`` (lists of
      ``(epoch, loss, top1)``), and optional ``color``, ``linestyle``.
    path: PNG to write.
    title: figure title.
    eval_label: what the evaluation curve measures (y-axis label).
    zoom: zoom the accuracy axis on the top 80% of the points (the others
      are marked on the bottom edge with their values); else show all.

  Returns:
    ``path``.
  """
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.8),
                                        layout='constrained')
  colours = []
  for i, r in enumerate(runs):
    colour = r.get('color') or f'C{i % 10}'
    colours.append(colour)
    style = dict(color=colour, linestyle=r.get('linestyle', '-'))
    x, loss = _curve(r['train_curve'], 1)
    ax_loss.plot(x, loss, label=r['label'], **style)
    x, acc = _curve(r['eval_curve'], 2)
    ax_acc.plot(x, 100 * acc, marker='o', markersize=3, label=r['label'],
                **style)
  ax_loss.set_yscale('log')
  ax_loss.set_xlabel('epoch')
  ax_loss.set_ylabel('training loss (cross-entropy, window mean)')
  ax_loss.set_title('Training loss')
  ax_acc.set_xlabel('epoch')
  ax_acc.set_ylabel(f'{eval_label} accuracy (%)')
  accs = [100 * p[2] for r in runs for p in r['eval_curve']]
  clipped = False
  if accs and zoom:
    top = max(accs)
    low = max(0.0, min(np.percentile(accs, 20), top - 5) - 1)
    ax_acc.set_ylim(low, min(100.0, top + 0.5))
    # Points below the zoomed range: a marker on the bottom edge + value.
    span = min(100.0, top + 0.5) - low
    labels_at: dict[float, int] = {}
    for r, colour in zip(runs, colours):
      for epoch, _, acc in r['eval_curve']:
        if 100 * acc < low:
          clipped = True
          k = labels_at.get(round(epoch, 6), 0)
          labels_at[round(epoch, 6)] = k + 1
          ax_acc.plot(epoch, low + 0.02 * span, marker='v', markersize=7,
                      color=colour, clip_on=False)
          ax_acc.annotate(f'{100 * acc:.1f}%',
                          (epoch, low + (0.05 + 0.05 * k) * span),
                          fontsize=7, ha='center', color=colour)
  ax_acc.set_title('Test accuracy' + (
      ' (v on the bottom edge: a point below the axis, value shown)'
      if clipped else ''))
  for ax in (ax_loss, ax_acc):
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title)
  return _save(fig, path)


def plot_eta(etas: Sequence[float], accuracies: Sequence[float],
             losses: Sequence[float], path: str, *, title: str) -> str:
  """Final test accuracy and training loss against eta (log axis)."""
  order = np.argsort(etas)
  etas = np.asarray(etas)[order]
  acc = 100 * np.asarray(accuracies)[order]
  loss = np.asarray(losses)[order]
  fig, ax = plt.subplots(figsize=(6.5, 4.2), layout='constrained')
  ax.plot(etas, acc, 'o-', color='tab:red', label='test accuracy')
  ax.set_xscale('log')
  ax.set_xlabel('eta (adaptive learning rate, eq. 13)')
  ax.set_ylabel('test accuracy (%)', color='tab:red')
  ax.grid(True, alpha=0.3)
  ax2 = ax.twinx()
  ax2.plot(etas, loss, 's--', color='tab:blue', label='final training loss')
  ax2.set_ylabel('final training loss', color='tab:blue')
  lines = ax.get_lines() + ax2.get_lines()
  ax.legend(lines, [l.get_label() for l in lines], fontsize=8,
            loc='lower center')
  ax.set_title(title)
  return _save(fig, path)


def plot_features(panels: Sequence[dict[str, Any]], path: str) -> str:
  """Figure 1: 2-D test features by class, one panel per net.

  Args:
    panels: dicts with ``title``, ``features`` ``[N, 2]``, ``labels``
      ``[N]``, ``kind`` (``'cnn'``: the classifier's weight directions are
      drawn as rays from the origin; ``'adder'``: its l1 templates as
      numbered markers) and ``classifier`` (the ``[2, C]`` kernel).
    path: PNG to write.

  Returns:
    ``path``.
  """
  cmap = plt.get_cmap('tab10')
  fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 6.0),
                           layout='constrained')
  axes = np.atleast_1d(axes)
  for ax, p in zip(axes, panels):
    f, y = np.asarray(p['features']), np.asarray(p['labels'])
    for c in range(10):
      sel = y == c
      ax.scatter(f[sel, 0], f[sel, 1], s=2, alpha=0.45, color=cmap(c),
                 label=str(c), rasterized=True)
    lo, hi = np.percentile(f, 0.5, axis=0), np.percentile(f, 99.5, axis=0)
    pad = 0.08 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    w = np.asarray(p['classifier'])
    if p['kind'] == 'adder':
      for c in range(w.shape[1]):
        ax.scatter(w[0, c], w[1, c], s=160, marker='o', color=cmap(c),
                   edgecolors='black', linewidths=1.5, zorder=5)
        ax.annotate(str(c), (w[0, c], w[1, c]), ha='center', va='center',
                    fontsize=8, fontweight='bold', zorder=6)
      lo = np.minimum(lo, w.min(axis=1) - pad)
      hi = np.maximum(hi, w.max(axis=1) + pad)
    else:
      reach = float(np.max(np.abs(np.concatenate([lo, hi]))))
      for c in range(w.shape[1]):
        d = w[:, c] / (np.linalg.norm(w[:, c]) + 1e-12) * reach
        ax.plot([0, d[0]], [0, d[1]], color=cmap(c), linewidth=1.5,
                zorder=5)
        ax.annotate(str(c), (0.92 * d[0], 0.92 * d[1]), fontsize=8,
                    fontweight='bold', zorder=6)
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_xlabel('feature 1')
    ax.set_ylabel('feature 2')
    ax.set_title(p['title'], fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(title='digit', markerscale=5, fontsize=7, loc='upper right',
              ncol=2)
  fig.suptitle('Figure 1: 2-D features of a LeNet++-style net on the MNIST '
               'test set')
  return _save(fig, path)


def _filter_grid(ax, kernels: np.ndarray, title: str) -> None:
  """Draws ``[kh, kw, cin, cout]`` as a grid: rows cin, columns cout."""
  kh, kw, cin, cout = kernels.shape
  gap = 1
  canvas = np.full((cin * (kh + gap) - gap, cout * (kw + gap) - gap), np.nan)
  for o in range(cout):
    k = kernels[:, :, :, o]
    lo, hi = k.min(), k.max()
    k = (k - lo) / (hi - lo) if hi > lo else np.zeros_like(k)
    for i in range(cin):
      r, c = i * (kh + gap), o * (kw + gap)
      canvas[r:r + kh, c:c + kw] = k[:, :, i]
  cmap = plt.get_cmap('gray').with_extremes(bad='white')
  ax.imshow(canvas, cmap=cmap, vmin=0, vmax=1, interpolation='nearest')
  ax.set_xticks([o * (kw + gap) + kw / 2 - 0.5 for o in range(cout)])
  ax.set_xticklabels([str(o) for o in range(cout)], fontsize=6)
  ax.set_yticks([i * (kh + gap) + kh / 2 - 0.5 for i in range(cin)])
  ax.set_yticklabels([str(i) for i in range(cin)], fontsize=6)
  ax.set_xlabel('output channel')
  ax.set_ylabel('input channel')
  ax.set_title(title, fontsize=9)


def plot_filters(nets: Sequence[dict[str, Any]], path: str) -> str:
  """Figure 2: learned filters of LeNet-5-BN, one column per net.

  Args:
    nets: dicts with ``label`` and ``layers``: a list of ``(name, kernel)``
      with kernels ``[kh, kw, cin, cout]``.
    path: PNG to write.

  Returns:
    ``path``.
  """
  n_layers = max(len(n['layers']) for n in nets)
  width = 6.5
  heights = []
  for i in range(n_layers):
    kh, kw, cin, cout = np.shape(nets[0]['layers'][i][1])
    aspect = (cin * (kh + 1)) / (cout * (kw + 1))
    heights.append(aspect * width + 1.0)  # + title and axis labels
  fig, axes = plt.subplots(
      n_layers, len(nets), figsize=(width * len(nets), sum(heights) + 0.6),
      gridspec_kw={'height_ratios': heights}, squeeze=False,
      layout='constrained')
  for j, net in enumerate(nets):
    for i, (name, kernel) in enumerate(net['layers']):
      _filter_grid(axes[i, j], np.asarray(kernel), f'{net["label"]}: {name}')
  fig.suptitle('Figure 2: learned 5x5 filters of LeNet-5-BN (each output '
               'filter scaled to its own min..max, black = min)')
  return _save(fig, path)


def plot_histograms(panels: Sequence[dict[str, Any]], path: str, *,
                    ncols: int = 2) -> str:
  """Figure 3: weight histograms with the fitted Laplace and Gaussian pdfs.

  Args:
    panels: dicts with ``title``, ``weights`` and ``fits`` (the output of
      :func:`experiments.reproduce_lib.analysis.compare_fits`).
    path: PNG to write.
    ncols: panels per row.

  Returns:
    ``path``.
  """
  nrows = math.ceil(len(panels) / ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.4 * nrows),
                           squeeze=False, layout='constrained')
  for ax, p in zip(axes.flat, panels):
    w = np.asarray(p['weights'], np.float64).reshape(-1)
    fits = p['fits']
    g, l = fits['gaussian'], fits['laplace']
    lo, hi = np.percentile(w, 0.2), np.percentile(w, 99.8)
    ax.hist(w, bins=80, range=(lo, hi), density=True, color='lightgray',
            edgecolor='gray', linewidth=0.3, label=f'weights (n={w.size})')
    x = np.linspace(lo, hi, 400)
    gauss = np.exp(-0.5 * ((x - g['mean']) / g['std']) ** 2) / (
        g['std'] * math.sqrt(2 * math.pi))
    lap = np.exp(-np.abs(x - l['loc']) / l['scale']) / (2 * l['scale'])
    ax.plot(x, lap, color='tab:red', linewidth=1.8,
            label=f'Laplace fit, loglik/w {fits["loglik_per_weight_laplace"]:.3f}')
    ax.plot(x, gauss, color='tab:blue', linewidth=1.8, linestyle='--',
            label=f'Gaussian fit, loglik/w {fits["loglik_per_weight_gaussian"]:.3f}')
    ax.set_xlabel('weight value')
    ax.set_ylabel('density')
    ax.set_title(f'{p["title"]}: better fit {fits["better"]} '
                 f'(excess kurtosis {fits["excess_kurtosis"]:.2f})',
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis('off')
  fig.suptitle('Figure 3: weight distributions of LeNet-5-BN layers '
               '(maximum-likelihood fits)')
  return _save(fig, path)
