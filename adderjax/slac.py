"""The skew-Laplace classifier (SLAC) head and its losses.

An AdderNet's features (``-sum |x - w|`` through BatchNorm and ReLU) are
heavy-tailed; SLAC (Dong et al., NeurIPS 2021) replaces the last linear layer
by one multivariate skew-Laplace density per class on the pooled feature
``x`` (``d`` dims), with location ``mu_k``, scatter ``Sigma_k`` and skew
``gamma_k``:

.. code-block:: text

  alpha_k  = sqrt(1 + gamma_k^T Sigma_k^-1 gamma_k)
  log f_k(x) = -log(2^d pi^((d-1)/2) Gamma((d+1)/2)) - 1/2 log|Sigma_k|
               - log alpha_k - alpha_k sqrt((x - mu_k)^T Sigma_k^-1 (x - mu_k))
               + (x - mu_k)^T Sigma_k^-1 gamma_k

The head's logits are ``log f_k(x) + log p(k)`` with ``p(k) = 1/K``, so the
usual softmax cross-entropy on them is the paper's ``L_c``. Its two extra
losses are :func:`nll_loss` (``-log f_y(x)``) and :func:`ac_loss` (the skew
directions ``gamma`` aligned with the distances between the class centres);
the paper trains ``L_c + 0.01 L_nll + 0.1 L_ac`` with the learning rate of
``Sigma`` divided by 100 (``experiments``: the ``:slac`` config token).

Parametrisation (ours; the paper gives only the initial values): the
parameter named ``sigma`` holds the log-Cholesky factor of the precision
``Sigma^-1``. With ``covariance='full'`` it is a ``(K, d, d)`` array ``R``
and ``Sigma^-1 = P P^T`` with ``P = tril(R, -1) + diag(exp(-diag(R)))``,
positive definite for every ``R``; with ``covariance='diagonal'`` it is
``(K, d)`` and ``Sigma = diag(exp(2 R))`` (``R`` the log standard
deviations; the full form with a zero strict lower triangle is the same).
Zero initialises ``Sigma`` to the identity, as the paper; ``gamma`` starts
at zero (a symmetric Laplace) and ``mu`` Xavier uniform. Every quantity of
the density is then a product with ``P`` (``(x - mu)^T Sigma^-1 (x - mu) =
|P^T (x - mu)|^2``, ``log|Sigma| = -2 sum log diag P``): the head and its
losses need no factorisation, inverse or triangular solve (no LAPACK call,
whose OpenBLAS threads deadlocked a CPU training run). The parameter names
``mu``, ``sigma`` and ``gamma`` are what a per-parameter learning-rate
factor (``config.optimizer.lr_scales``) matches.

In training the head sows ``{'log_density', 'mu', 'sigma_inv', 'gamma'}``
(``sigma_inv``: the precision matrices ``Sigma^-1``, or the inverse
variances for a diagonal head) into the ``'intermediates'`` collection
under the name ``'slac'``; the loss terms read them from there.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> head = SLACHead(num_classes=3)
  >>> x = jnp.ones((2, 4))
  >>> variables = head.init(jax.random.key(0), x)
  >>> {k: v.shape for k, v in sorted(variables['params'].items())}
  {'gamma': (3, 4), 'mu': (3, 4), 'sigma': (3, 4, 4)}
  >>> logits, state = head.apply(variables, x, mutable=['intermediates'])
  >>> logits.shape, sorted(state['intermediates']['slac'][0])
  ((2, 3), ['gamma', 'log_density', 'mu', 'sigma_inv'])

References:
  X. Dong, H. Chen, ..., Y. Wang. "Handling Long-tailed Feature Distribution
  in AdderNets", NeurIPS 2021.
  https://proceedings.neurips.cc/paper/2021/hash/95323660ed2124450caaac2c46b5ed90-Abstract.html
  (the density: H. Arslan, "An alternative multivariate skew Laplace
  distribution", Statistical Papers 51, 2010).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from adderjax import _checks

Initializer = Any

#: ``Sigma``'s parametrisations (see the module docstring).
COVARIANCES = ('full', 'diagonal')

#: Name of the head's entry in the ``'intermediates'`` collection.
SOW_NAME = 'slac'

# The Mahalanobis radius sqrt(q) is taken of max(q, _Q_FLOOR): its gradient
# is infinite at q = 0 (x exactly at mu), a measure-zero event.
_Q_FLOOR = 1e-20


def log_normalizer(d: int) -> float:
  """``log(2^d pi^((d-1)/2) Gamma((d+1)/2))``, the density's constant.

  Args:
    d: the feature dimension (a positive int).

  Returns:
    The constant as a Python float.

  Raises:
    ValueError: ``d`` is not a positive int.

  Examples:
    >>> import math
    >>> math.isclose(log_normalizer(2), math.log(2 * math.pi))
    True
  """
  d = _checks.positive_int('d', d)
  return (d * math.log(2.0) + 0.5 * (d - 1) * math.log(math.pi)
          + math.lgamma(0.5 * (d + 1)))


def precision_factor(raw: jax.Array, covariance: str = 'full') -> jax.Array:
  """The factor ``P`` of ``Sigma^-1 = P P^T`` from the head's ``sigma``.

  Args:
    raw: the head's ``sigma`` parameter: ``(..., d, d)`` for
      ``covariance='full'`` (the strict lower triangle as is, the diagonal
      through ``exp(-.)``; the upper triangle is ignored), ``(..., d)`` for
      ``'diagonal'`` (log standard deviations).
    covariance: ``'full'`` or ``'diagonal'``.

  Returns:
    ``P``: lower-triangular ``(..., d, d)`` with a positive diagonal, or the
    inverse standard deviations ``(..., d)`` (``Sigma^-1 = diag(P^2)``).

  Raises:
    ValueError: an unknown ``covariance``, or ``raw`` of the wrong rank.

  Examples:
    >>> import jax.numpy as jnp
    >>> precision_factor(jnp.zeros((1, 2, 2))).tolist()
    [[[1.0, 0.0], [0.0, 1.0]]]
    >>> precision_factor(jnp.log(jnp.array([[2.0, 4.0]])), 'diagonal').tolist()
    [[0.5, 0.25]]
  """
  _checks.choice('covariance', covariance, COVARIANCES)
  raw = jnp.asarray(raw)
  if covariance == 'diagonal':
    if raw.ndim < 1:
      raise ValueError(f'`raw` of a diagonal covariance must be (..., d), got '
                       f'shape {raw.shape}.')
    return jnp.exp(-raw)
  if raw.ndim < 2 or raw.shape[-1] != raw.shape[-2]:
    raise ValueError(f'`raw` of a full covariance must be (..., d, d), got '
                     f'shape {raw.shape}.')
  diag = jnp.diagonal(raw, axis1=-2, axis2=-1)
  return jnp.tril(raw, -1) + jnp.exp(-diag)[..., None] * jnp.eye(
      raw.shape[-1], dtype=raw.dtype)


def _precision_of(factor: jax.Array, diagonal: bool) -> jax.Array:
  if diagonal:
    return jnp.square(factor)
  return factor @ jnp.swapaxes(factor, -1, -2)


def _whiten(factor: jax.Array, v: jax.Array, diagonal: bool) -> jax.Array:
  """``P^T v`` for ``v`` of shape ``(K, M, d)`` (``factor``: K factors)."""
  if diagonal:
    return v * factor[:, None, :]
  return v @ factor


def _log_density(x, mu, factor, gamma, diagonal: bool) -> jax.Array:
  """``log f_k(x)`` as ``(N, K)`` from the precision factors (no checks)."""
  d = x.shape[-1]
  z = _whiten(factor, x[None, :, :] - mu[:, None, :], diagonal)  # (K, N, d)
  g = _whiten(factor, gamma[:, None, :], diagonal)[:, 0, :]      # (K, d)
  diag = factor if diagonal else jnp.diagonal(factor, axis1=-2, axis2=-1)
  log_det = -2.0 * jnp.sum(jnp.log(diag), axis=-1)               # log|Sigma|
  alpha = jnp.sqrt(1.0 + jnp.sum(jnp.square(g), axis=-1))        # (K,)
  radius = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(z), axis=-1), _Q_FLOOR))
  skew = jnp.einsum('knd,kd->kn', z, g)
  log_f = (-log_normalizer(d) - 0.5 * log_det[:, None]
           - jnp.log(alpha)[:, None] - alpha[:, None] * radius + skew)
  return log_f.T


def _check_params(mu, sigma, gamma, x=None,
                  sigma_name: str = 'sigma') -> tuple[Any, ...]:
  mu, sigma, gamma = (jnp.asarray(a) for a in (mu, sigma, gamma))
  if mu.ndim != 2:
    raise ValueError(f'`mu` must be (K, d) (one location per class), got '
                     f'shape {mu.shape}.')
  k, d = mu.shape
  if gamma.shape != (k, d):
    raise ValueError(f'`gamma` must have the shape of `mu` {mu.shape}, got '
                     f'{gamma.shape}.')
  if sigma.shape not in ((k, d, d), (k, d)):
    raise ValueError(f'`{sigma_name}` must be (K, d, d) matrices or (K, d) '
                     f'diagonals, i.e. {(k, d, d)} or {(k, d)} for `mu` of '
                     f'shape {mu.shape}; got {sigma.shape}.')
  if x is not None:
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[-1] != d:
      raise ValueError(f'`x` must be (N, d) with d = {d} (the last axis of '
                       f'`mu`), got shape {x.shape}.')
  return x, mu, sigma, gamma, sigma.ndim == 2




def skew_laplace_log_density(x: jax.Array, mu: jax.Array, sigma: jax.Array,
                             gamma: jax.Array) -> jax.Array:
  """Log-density of K multivariate skew-Laplace distributions at N points.

  ``log f_k(x) = -log(2^d pi^((d-1)/2) Gamma((d+1)/2)) - 1/2 log|Sigma_k|
  - log alpha_k - alpha_k sqrt((x - mu_k)^T Sigma_k^-1 (x - mu_k))
  + (x - mu_k)^T Sigma_k^-1 gamma_k`` with
  ``alpha_k = sqrt(1 + gamma_k^T Sigma_k^-1 gamma_k)``, computed through
  the Cholesky factor of ``Sigma_k^-1`` (an inverse and a Cholesky
  factorisation here; the head keeps that factor as its parameter).

  Args:
    x: ``(N, d)`` points.
    mu: ``(K, d)`` locations.
    sigma: ``(K, d, d)`` symmetric positive-definite scatter matrices, or
      ``(K, d)`` variances (diagonal matrices). Not positive definite: NaN.
    gamma: ``(K, d)`` skew vectors (zero: the symmetric Laplace).

  Returns:
    ``(N, K)``: ``log f_k(x_n)``, in the dtype of the inputs' promotion.

  Raises:
    ValueError: shapes that do not fit together (names the argument).

  Examples:
    >>> import math, jax.numpy as jnp
    >>> v = skew_laplace_log_density(jnp.zeros((1, 2)), jnp.zeros((1, 2)),
    ...                              jnp.eye(2)[None], jnp.zeros((1, 2)))
    >>> math.isclose(float(v[0, 0]), -math.log(2 * math.pi), rel_tol=1e-6)
    True
  """
  x, mu, sigma, gamma, diagonal = _check_params(mu, sigma, gamma, x)
  factor = (1.0 / jnp.sqrt(sigma) if diagonal
            else jnp.linalg.cholesky(jnp.linalg.inv(sigma)))
  return _log_density(x, mu, factor, gamma, diagonal)


def nll_loss(log_density: jax.Array, labels: jax.Array) -> jax.Array:
  """``L_nll``: the mean of ``-log f_y(x)`` over the batch.

  Args:
    log_density: ``(N, K)`` log-densities (:func:`skew_laplace_log_density`,
      or the head's sown ``'log_density'``).
    labels: ``(N,)`` integer labels in ``[0, K)``.

  Returns:
    A float32 scalar.

  Raises:
    ValueError: shapes that do not fit together.

  Examples:
    >>> import jax.numpy as jnp
    >>> float(nll_loss(jnp.array([[-1., -5.], [-7., -3.]]), jnp.array([0, 1])))
    2.0
  """
  log_density, labels = jnp.asarray(log_density), jnp.asarray(labels)
  if log_density.ndim != 2:
    raise ValueError(f'`log_density` must be (N, K), got shape '
                     f'{log_density.shape}.')
  if labels.shape != log_density.shape[:1]:
    raise ValueError(f'`labels` must be (N,) = {log_density.shape[:1]} for '
                     f'`log_density` of shape {log_density.shape}, got '
                     f'{labels.shape}.')
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise _checks.ArgumentTypeError(
        f'`labels` must be integers, got dtype {labels.dtype}.')
  picked = jnp.take_along_axis(log_density.astype(jnp.float32),
                               labels[:, None], axis=1)
  return -jnp.mean(picked)


def ac_loss(mu: jax.Array, sigma_inv: jax.Array, gamma: jax.Array, *,
            eps: float = 1e-8) -> jax.Array:
  """``L_ac``: skew directions aligned with the class-centre distances.

  ``D_gamma(m, n) = cos(gamma_m, gamma_n)``,
  ``D_mu(m, n) = (mu_m - mu_n)^T Sigma_n^-1 (mu_m - mu_n)``, the target
  ``D^(m, n) = [max_n' D_mu(m, n') - 2 D_mu(m, n)] / max_n' D_mu(m, n')``
  (1 for ``n = m``, -1 for the farthest class), and
  ``L_ac = mean over all (m, n) of (D_gamma(m, n) - D^(m, n))^2``.

  Choices the paper leaves open: the target is a target (no gradient flows
  through it into ``mu`` or ``Sigma``: only ``gamma`` is moved by this
  loss); the mean runs over all ``K^2`` pairs, ``m = n`` included; the
  cosine's denominator is ``max(|gamma_m| |gamma_n|, eps)`` (0 for a zero
  ``gamma``, the initial value, where the cosine is undefined); a row whose
  distances are all zero (coinciding centres) has target 0.

  Args:
    mu: ``(K, d)`` locations, ``K >= 2``.
    sigma_inv: ``(K, d, d)`` precision matrices ``Sigma_k^-1`` or ``(K, d)``
      inverse variances (the head sows them as ``'sigma_inv'``).
    gamma: ``(K, d)`` skew vectors.
    eps: floor of the cosine's denominator (> 0).

  Returns:
    A float32 scalar.

  Raises:
    ValueError: shapes that do not fit together, ``K < 2``, ``eps <= 0``.

  Examples:
    >>> import jax.numpy as jnp
    >>> mu = jnp.array([[0., 0.], [1., 0.], [3., 0.]])
    >>> gamma = jnp.array([[1., 0.], [1., 0.], [-1., 0.]])
    >>> round(float(ac_loss(mu, jnp.ones((3, 2)), gamma)), 4)
    0.1704
  """
  _, mu, sigma_inv, gamma, diagonal = _check_params(
      mu, sigma_inv, gamma, sigma_name='sigma_inv')
  eps = _checks.finite_number('eps', eps, low=0, low_open=True)
  k = mu.shape[0]
  if k < 2:
    raise ValueError(f'`mu` must hold at least 2 classes for the pairwise '
                     f'loss, got shape {mu.shape}.')
  mu, sigma_inv, gamma = (a.astype(jnp.float32)
                          for a in (mu, sigma_inv, gamma))
  mu_t, prec = jax.lax.stop_gradient(mu), jax.lax.stop_gradient(sigma_inv)
  diff = mu_t[:, None, :] - mu_t[None, :, :]        # [m, n] = mu_m - mu_n
  if diagonal:
    d_mu = jnp.einsum('mnd,nd,mnd->mn', diff, prec, diff)
  else:
    d_mu = jnp.einsum('mnd,nde,mne->mn', diff, prec, diff)
  d_max = jnp.max(d_mu, axis=1, keepdims=True)
  target = (d_max - 2.0 * d_mu) / jnp.where(d_max > 0, d_max, 1.0)
  sq_norm = jnp.sum(jnp.square(gamma), axis=-1)
  denom = jnp.sqrt(jnp.maximum(sq_norm[:, None] * sq_norm[None, :], eps**2))
  cosine = (gamma @ gamma.T) / denom
  return jnp.mean(jnp.square(cosine - target))


def _check_head_input(x, d: int | None, layer: str) -> jax.Array:
  x = jnp.asarray(x)
  if x.ndim != 2 or (d is not None and x.shape[-1] != d):
    want = f'(N, {d})' if d is not None else '(N, d)'
    raise ValueError(f'{layer} expects pooled features {want}, got an input '
                     f'of shape {x.shape}.')
  return x.astype(jnp.float32)


def _head_outputs(x, mu, raw, gamma, covariance: str):
  factor = precision_factor(raw, covariance)
  diagonal = covariance == 'diagonal'
  log_f = _log_density(x, mu, factor, gamma, diagonal)
  sown = {'log_density': log_f, 'mu': mu,
          'sigma_inv': _precision_of(factor, diagonal), 'gamma': gamma}
  return log_f - math.log(mu.shape[0]), sown


def _sigma_shape(num_classes: int, d: int, covariance: str) -> tuple:
  return (num_classes, d, d) if covariance == 'full' else (num_classes, d)


class SLACHead(nn.Module):
  """The SLAC classifier head (Linen): pooled features -> class logits.

  Returns ``log f_k(x) + log(1/K)`` in float32 (inputs are cast to float32;
  parameters are float32). Sows the values the losses need (see the module
  docstring) when the ``'intermediates'`` collection is mutable.

  Attributes:
    num_classes: ``K``, the number of classes.
    covariance: ``'full'`` (``(K, d, d)`` ``sigma``: the log-Cholesky
      factor of ``Sigma^-1``) or ``'diagonal'`` (``(K, d)`` log standard
      deviations).
    mu_init: initialiser of ``mu`` ``(K, d)`` (Xavier uniform, the paper's).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> head = SLACHead(num_classes=2, covariance='diagonal')
    >>> v = head.init(jax.random.key(0), jnp.zeros((1, 3)))
    >>> v['params']['sigma'].shape
    (2, 3)
  """
  num_classes: int
  covariance: str = 'full'
  mu_init: Initializer = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _checks.positive_int('num_classes', self.num_classes)
    _checks.choice('covariance', self.covariance, COVARIANCES)
    x = _check_head_input(x, None, 'SLACHead')
    k, d = self.num_classes, x.shape[-1]
    mu = self.param('mu', self.mu_init, (k, d), jnp.float32)
    raw = self.param('sigma', nn.initializers.zeros,
                     _sigma_shape(k, d, self.covariance), jnp.float32)
    gamma = self.param('gamma', nn.initializers.zeros, (k, d), jnp.float32)
    logits, sown = _head_outputs(x, mu, raw, gamma, self.covariance)
    self.sow('intermediates', SOW_NAME, sown)
    return logits


class SLACHeadNNX(nnx.Module):
  """The SLAC classifier head (NNX), the twin of :class:`SLACHead`.

  Same parameters (``mu``, ``sigma``, ``gamma``, same shapes and meaning)
  and the same outputs. Inside :func:`flax.nnx.capture` (with
  ``nnx.Intermediate``) it sows the same dictionary under ``'slac'``;
  outside it sows nothing (flax 0.12 deprecates ``sow`` outside ``capture``,
  where it would keep every call's values as an attribute of the module).

  Args:
    in_features: ``d``, the pooled feature size.
    num_classes: ``K``.
    covariance: ``'full'`` or ``'diagonal'`` (see :class:`SLACHead`).
    mu_init: initialiser of ``mu`` (Xavier uniform).
    rngs: random streams (``params`` is used).

  Raises:
    ValueError: a bad size or ``covariance``; ``rngs`` not an
      ``nnx.Rngs``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> head = SLACHeadNNX(4, 3, rngs=nnx.Rngs(0))
    >>> head(jnp.ones((2, 4))).shape
    (2, 3)
    >>> head.sigma.shape
    (3, 4, 4)
    >>> logits, inter = nnx.capture(head, nnx.Intermediate)(jnp.ones((2, 4)))
    >>> find_sown(inter)['log_density'].shape
    (2, 3)
  """

  def __init__(self, in_features: int, num_classes: int, *,
               covariance: str = 'full',
               mu_init: Initializer = nn.initializers.xavier_uniform(),
               rngs: nnx.Rngs):
    d = _checks.positive_int('in_features', in_features)
    k = _checks.positive_int('num_classes', num_classes)
    _checks.choice('covariance', covariance, COVARIANCES)
    if not isinstance(rngs, nnx.Rngs):
      raise _checks.ArgumentTypeError(
          f'`rngs` of SLACHeadNNX must be a flax.nnx.Rngs (e.g. '
          f'rngs=nnx.Rngs(0)), got {_checks.describe(rngs)}.')
    self.in_features, self.num_classes = d, k
    self.covariance = covariance
    self.mu = nnx.Param(mu_init(rngs.params(), (k, d), jnp.float32))
    self.sigma = nnx.Param(jnp.zeros(_sigma_shape(k, d, covariance),
                                     jnp.float32))
    self.gamma = nnx.Param(jnp.zeros((k, d), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = _check_head_input(x, self.in_features, 'SLACHeadNNX')
    logits, sown = _head_outputs(x, self.mu[...], self.sigma[...],
                                 self.gamma[...], self.covariance)
    if getattr(self, '__captures__', None) is not None:  # in nnx.capture
      self.sow(nnx.Intermediate, SOW_NAME, sown)
    return logits


def find_sown(intermediates: Any) -> dict[str, jax.Array]:
  """The values a SLAC head sowed, found in an ``intermediates`` tree.

  Args:
    intermediates: a Linen model's ``'intermediates'`` collection (nested
      dicts; the head's entry is a 1-tuple under the key ``'slac'`` at any
      depth), or the ``nnx.Intermediate`` state of :func:`flax.nnx.capture`.

  Returns:
    ``{'log_density', 'mu', 'sigma_inv', 'gamma'}`` of the one SLAC head.

  Raises:
    ValueError: no SLAC head sowed values (the model has none, or the
      collection was not mutable), or more than one did.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> head = SLACHead(num_classes=2)
    >>> v = head.init(jax.random.key(0), jnp.zeros((1, 3)))
    >>> _, s = head.apply(v, jnp.zeros((1, 3)), mutable=['intermediates'])
    >>> find_sown({'fc': s['intermediates']})['mu'].shape
    (2, 3)
  """
  found = []

  def walk(node):
    if hasattr(node, 'items'):
      for key, value in node.items():
        if isinstance(value, nnx.Variable):  # an nnx.capture State
          value = value.get_value()
        if key == SOW_NAME and isinstance(value, tuple):
          found.extend(value)
        else:
          walk(value)
  walk(intermediates)
  if len(found) != 1:
    what = 'none' if not found else f'{len(found)} values'
    raise ValueError(
        f'the SLAC losses need the values one SLACHead sows into the '
        f"'intermediates' collection, found {what}: build the model with "
        "head='slac' (config: model.overrides.head='slac') and run it with "
        "mutable=['intermediates'].")
  return found[0]


__all__ = ['COVARIANCES', 'SLACHead', 'SLACHeadNNX', 'ac_loss', 'find_sown',
           'log_normalizer', 'nll_loss', 'precision_factor',
           'skew_laplace_log_density']
