"""Numbers of the reproduction: distribution fits, adaptive scales, spreads.

* :func:`compare_fits`: maximum-likelihood Gaussian and Laplace fits of a
  weight tensor and their log-likelihoods (the paper's Figure 3 claims adder
  filters are Laplace-like, conv filters Gaussian-like).
* :func:`adaptive_scales`: the per-layer adaptive learning rate of the paper
  (eq. 13) of a gradient, used to pick the ILR baseline's factor.
* :func:`mean_std`: mean and sample standard deviation over seeds.

Examples:
  >>> import numpy as np
  >>> w = np.random.default_rng(0).laplace(size=20000)
  >>> compare_fits(w)['better']
  'laplace'
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


def fit_gaussian(w) -> tuple[float, float]:
  """Maximum-likelihood Gaussian: ``(mean, std)`` (std with ``1/n``).

  Examples:
    >>> fit_gaussian([1.0, 3.0])
    (2.0, 1.0)
  """
  w = _flat(w)
  return float(w.mean()), float(w.std())


def fit_laplace(w) -> tuple[float, float]:
  """Maximum-likelihood Laplace: ``(median, mean |w - median|)``.

  Examples:
    >>> fit_laplace([0.0, 1.0, 5.0])
    (1.0, 1.6666666666666667)
  """
  w = _flat(w)
  loc = float(np.median(w))
  return loc, float(np.abs(w - loc).mean())


def gaussian_loglik(w, mean: float, std: float) -> float:
  """Total log-likelihood of ``w`` under N(mean, std^2).

  Examples:
    >>> round(gaussian_loglik([0.0], 0.0, 1.0), 6)  # -log(sqrt(2 pi))
    -0.918939
  """
  w = _flat(w)
  _check_scale('std', std)
  z = (w - mean) / std
  return float(-0.5 * np.sum(z * z) - w.size * (math.log(std) +
                                                0.5 * math.log(2 * math.pi)))


def laplace_loglik(w, loc: float, scale: float) -> float:
  """Total log-likelihood of ``w`` under Laplace(loc, scale).

  Examples:
    >>> round(laplace_loglik([0.0], 0.0, 1.0), 6)  # -log 2
    -0.693147
  """
  w = _flat(w)
  _check_scale('scale', scale)
  return float(-np.sum(np.abs(w - loc)) / scale -
               w.size * math.log(2 * scale))


def compare_fits(w) -> dict[str, Any]:
  """Fits both distributions to ``w`` and says which fits better.

  Args:
    w: any array of weights (flattened).

  Returns:
    ``{'n', 'gaussian': {'mean', 'std', 'loglik'}, 'laplace': {'loc',
    'scale', 'loglik'}, 'loglik_per_weight_gaussian',
    'loglik_per_weight_laplace', 'better', 'excess_kurtosis'}``, where
    ``better`` is the distribution with the larger log-likelihood (both have
    two parameters, so this is also the AIC / BIC choice) and the excess
    kurtosis is 0 for a Gaussian and 3 for a Laplace.

  Raises:
    ValueError: fewer than two weights, or constant weights.
  """
  w = _flat(w)
  if w.size < 2:
    raise ValueError(f'need at least two weights, got {w.size}.')
  mean, std = fit_gaussian(w)
  loc, scale = fit_laplace(w)
  if std == 0 or scale == 0:
    raise ValueError('the weights are constant: no distribution to fit.')
  ll_g = gaussian_loglik(w, mean, std)
  ll_l = laplace_loglik(w, loc, scale)
  z = (w - mean) / std
  return {
      'n': int(w.size),
      'gaussian': {'mean': mean, 'std': std, 'loglik': ll_g},
      'laplace': {'loc': loc, 'scale': scale, 'loglik': ll_l},
      'loglik_per_weight_gaussian': ll_g / w.size,
      'loglik_per_weight_laplace': ll_l / w.size,
      'better': 'laplace' if ll_l > ll_g else 'gaussian',
      'excess_kurtosis': float(np.mean(z ** 4) - 3.0),
  }


def adaptive_scales(grads, mask, eta: float = 0.2,
                    eps: float = 1e-12) -> dict[str, float]:
  """The paper's per-layer scale ``eta * sqrt(k) / ||g||_2`` (eq. 13).

  Args:
    grads: a gradient pytree.
    mask: a boolean pytree of the same structure (True: adder kernels).
    eta: the adaptive-LR eta.
    eps: lower bound of the norm.

  Returns:
    ``{'path/to/kernel': alpha}`` for every masked leaf.

  Examples:
    >>> import numpy as np
    >>> g = {'a': {'kernel': np.full((2, 2), 0.5)}, 'b': np.ones(3)}
    >>> adaptive_scales(g, {'a': {'kernel': True}, 'b': False})  # 0.2*2/1
    {'a/kernel': 0.4}
  """
  out = {}
  flat_g = jax.tree_util.tree_flatten_with_path(grads)[0]
  flat_m = jax.tree.leaves(mask)
  if len(flat_g) != len(flat_m):
    raise ValueError(f'grads have {len(flat_g)} leaves but the mask has '
                     f'{len(flat_m)}.')
  for (path, g), m in zip(flat_g, flat_m):
    if not m:
      continue
    g = np.asarray(g, np.float64)
    norm = max(float(np.sqrt(np.sum(g * g))), eps)
    name = '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k)))
                    for k in path)
    out[name] = float(eta * math.sqrt(g.size) / norm)
  return out


def geometric_mean(values) -> float:
  """Geometric mean of positive numbers.

  Examples:
    >>> round(geometric_mean([1.0, 100.0]), 9)
    10.0
  """
  v = np.asarray(list(values), np.float64)
  if v.size == 0 or np.any(v <= 0):
    raise ValueError(f'need positive values, got {v.tolist()}.')
  return float(np.exp(np.mean(np.log(v))))


def round_sig(x: float, digits: int = 2) -> float:
  """``x`` rounded to ``digits`` significant digits.

  Examples:
    >>> round_sig(123.456), round_sig(0.012345, 3)
    (120.0, 0.0123)
  """
  if x == 0:
    return 0.0
  return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def mean_std(values) -> tuple[float, float]:
  """Mean and sample standard deviation (``ddof=1``; 0 for one value).

  Examples:
    >>> mean_std([1.0, 3.0])
    (2.0, 1.4142135623730951)
    >>> mean_std([5.0])
    (5.0, 0.0)
  """
  v = np.asarray(list(values), np.float64)
  if v.size == 0:
    raise ValueError('no values.')
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _flat(w) -> np.ndarray:
  return np.asarray(w, np.float64).reshape(-1)


def _check_scale(name: str, value: float) -> None:
  if not value > 0:
    raise ValueError(f'{name} must be positive, got {value!r}.')
