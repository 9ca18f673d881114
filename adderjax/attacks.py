"""White-box l_inf adversarial attacks: FGSM, PGD, BIM and MIM.

Every attack works on any differentiable ``loss_fn(x, y) -> scalar`` (the
loss the attacker maximises; :func:`classifier_loss` builds the usual one,
the mean cross-entropy of a Flax model's logits) and on inputs ``x`` in pixel
space, ``[0, 1]`` by default (``valid_range``). Each iterate is projected onto
the intersection of the l_inf ball of radius ``epsilon`` around ``x`` and the
valid range, so the result never leaves either. The model's normalisation
belongs inside ``loss_fn`` (see :func:`classifier_loss`'s ``preprocess``):
the gradients then flow through it and the budget ``epsilon`` is measured in
pixels, as in the papers.

* :func:`fgsm`: one signed-gradient step of size ``epsilon`` (Goodfellow et
  al., 2015).
* :func:`pgd`: ``steps`` signed-gradient steps from a uniform random point of
  the ball (Madry et al., 2018); ``random_start=False`` starts at ``x``.
* :func:`bim`: ``steps`` signed-gradient steps from ``x`` (Kurakin et al.,
  2017), i.e. PGD without the random start and with step ``epsilon / steps``.
* :func:`mim`: BIM with momentum on the l1-normalised gradient (Dong et al.,
  2018).

The attacks are functions of arrays: they jit, vmap and run inside a train
step (``epsilon``, ``step_size`` may then be traced; ``steps`` must be a
Python int). The result carries no gradient (``lax.stop_gradient``).

Examples:
  >>> import jax.numpy as jnp
  >>> loss = lambda x, y: jnp.sum(x * y)   # its gradient is y
  >>> x = jnp.array([[0.5, 0.5, 0.875]])
  >>> y = jnp.array([[1.0, -1.0, 1.0]])
  >>> fgsm(loss, x, y, 0.25)
  Array([[0.75, 0.25, 1.  ]], dtype=float32)
  >>> bim(loss, x, y, 0.25, steps=4)
  Array([[0.75, 0.25, 1.  ]], dtype=float32)

References:
  Goodfellow, Shlens, Szegedy, "Explaining and Harnessing Adversarial
  Examples", ICLR 2015. https://arxiv.org/abs/1412.6572

  Kurakin, Goodfellow, Bengio, "Adversarial examples in the physical world",
  ICLR Workshop 2017. https://arxiv.org/abs/1607.02533

  Madry et al., "Towards Deep Learning Models Resistant to Adversarial
  Attacks", ICLR 2018. https://arxiv.org/abs/1706.06083

  Dong et al., "Boosting Adversarial Attacks with Momentum", CVPR 2018.
  https://arxiv.org/abs/1710.06081
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adderjax import _checks

__all__ = ['ATTACKS', 'attack', 'bim', 'classifier_loss', 'fgsm', 'mim',
           'pgd', 'project']

LossFn = Callable[[jax.Array, Any], jax.Array]

#: The attacks by name (:func:`attack` dispatches on it).
ATTACKS = ('fgsm', 'pgd', 'bim', 'mim')

#: Guards the l1 normalisation of MIM against an all-zero gradient.
_TINY = 1e-12


def classifier_loss(apply_fn: Callable, variables: Any, *,
                    preprocess: Callable[[jax.Array], jax.Array] | None = None,
                    **apply_kwargs) -> LossFn:
  """``loss_fn(x, labels)``: mean cross-entropy of a classifier's logits.

  Args:
    apply_fn: a Flax ``apply`` (``apply_fn(variables, inputs, **kwargs) ->
      logits``), or any function of that form.
    variables: its variables (``{'params': ..., 'batch_stats': ...}``).
    preprocess: maps pixel-space ``x`` to the model's input (normalisation,
      a dtype cast); the attack's gradient flows through it.
    **apply_kwargs: passed to ``apply_fn`` (e.g. ``train=False``: attack
      the model in evaluation mode, BatchNorm on its running statistics).

  Returns:
    ``(x, labels) -> scalar``, ``labels`` integer class indices.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> model = nn.Dense(3)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 4)))
    >>> loss = classifier_loss(model.apply, variables,
    ...                        preprocess=lambda x: (x - 0.5) / 0.25)
    >>> x, labels = jnp.full((2, 4), 0.5), jnp.array([0, 2])
    >>> x_adv = pgd(loss, x, labels, 0.1, steps=3, key=jax.random.key(1))
    >>> bool(loss(x_adv, labels) > loss(x, labels))
    True
  """
  if not callable(apply_fn):
    raise _checks.ArgumentTypeError(
        f'`apply_fn` must be callable, got {_checks.describe(apply_fn)}.')

  def loss_fn(x, labels):
    inputs = x if preprocess is None else preprocess(x)
    logits = apply_fn(variables, inputs, **apply_kwargs)
    if isinstance(logits, tuple):  # apply with mutable=...: (out, updates)
      logits = logits[0]
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels).mean()
  return loss_fn


# ----------------------------------------------------------------------------
# Checks.


def _check_range(valid_range) -> tuple[float, float] | None:
  if valid_range is None:
    return None
  if (isinstance(valid_range, (str, bytes)) or
      not hasattr(valid_range, '__len__') or len(valid_range) != 2):
    raise _checks.ArgumentTypeError(
        '`valid_range` must be a pair (low, high) or None, got '
        f'{_checks.describe(valid_range)}.')
  lo = _checks.finite_number('valid_range[0]', valid_range[0])
  hi = _checks.finite_number('valid_range[1]', valid_range[1])
  if not lo < hi:
    raise ValueError(f'`valid_range` must have low < high, got '
                     f'{_checks.describe(tuple(valid_range))}.')
  return lo, hi


def _check_common(loss_fn, x, y, epsilon, valid_range):
  """Checks the arguments every attack takes; returns x, epsilon, range."""
  if not callable(loss_fn):
    raise _checks.ArgumentTypeError(
        f'`loss_fn` must be callable, got {_checks.describe(loss_fn)}.')
  if not isinstance(x, (jax.Array, np.ndarray)) or not jnp.issubdtype(
      x.dtype, jnp.floating):
    raise _checks.ArgumentTypeError(
        '`x` must be a floating-point array of inputs in pixel space (e.g. '
        f'uint8 images / 255), got {_checks.describe(x)}'
        + (f' of dtype {x.dtype}' if hasattr(x, 'dtype') else '') + '.')
  if np.ndim(x) < 1:
    raise ValueError('`x` must be a batch (leading axis: examples), got a '
                     'scalar.')
  y_shape = np.shape(y) if isinstance(y, (jax.Array, np.ndarray)) else None
  if y_shape and y_shape[0] != x.shape[0]:
    raise ValueError(f'`y` must have one row per example of `x` '
                     f'({x.shape[0]}), got shape {tuple(y_shape)}.')
  epsilon = _checks.finite_number('epsilon', epsilon, low=0)
  valid_range = _check_range(valid_range)
  out = jax.eval_shape(loss_fn, x, y)
  if not hasattr(out, 'shape') or out.shape != () or not jnp.issubdtype(
      out.dtype, jnp.floating):
    raise ValueError('`loss_fn(x, y)` must return a floating-point scalar, '
                     f'got {out}.')
  return jnp.asarray(x), epsilon, valid_range


def _check_iterative(steps, step_size, epsilon, default_factor):
  steps = _checks.positive_int('steps', steps)
  if step_size is None:
    step_size = default_factor * epsilon / steps
  else:
    step_size = _checks.finite_number('step_size', step_size, low=0,
                                      low_open=True)
  return steps, step_size


# ----------------------------------------------------------------------------
# The attacks.


def project(x_adv: jax.Array, x: jax.Array, epsilon,
            valid_range: tuple[float, float] | None = (0.0, 1.0)
            ) -> jax.Array:
  """``x_adv`` clipped to the l_inf ball around ``x`` and the valid range.

  With ``x`` inside ``valid_range`` the result lies in both (one clip to the
  intersection box).

  Examples:
    >>> import jax.numpy as jnp
    >>> project(jnp.array([0.0, 0.5, 1.25]), jnp.array([0.25, 0.25, 0.875]),
    ...         0.125)
    Array([0.125, 0.375, 1.   ], dtype=float32)
  """
  lo, hi = x - epsilon, x + epsilon
  if valid_range is not None:
    lo = jnp.maximum(lo, valid_range[0])
    hi = jnp.minimum(hi, valid_range[1])
  return jnp.clip(x_adv, lo, hi).astype(x.dtype)


def _grad(loss_fn, x_adv, y):
  return jax.grad(lambda v: loss_fn(v, y))(x_adv)


def fgsm(loss_fn: LossFn, x: jax.Array, y: Any, epsilon, *,
         valid_range: tuple[float, float] | None = (0.0, 1.0)) -> jax.Array:
  """Fast gradient sign method: ``x + epsilon * sign(grad_x loss)``, clipped.

  Args:
    loss_fn: ``(x, y) -> scalar`` to maximise.
    x: inputs, leading axis the examples, inside ``valid_range``.
    y: the labels (anything ``loss_fn`` takes; an array must have one row
      per example).
    epsilon: the l_inf budget (>= 0, in the units of ``x``).
    valid_range: ``(low, high)`` of valid inputs, or ``None`` (unbounded).

  Returns:
    The adversarial inputs, shape and dtype of ``x``.

  Raises:
    ValueError: a negative or non-finite ``epsilon``, a bad
      ``valid_range``, ``y`` with another number of rows than ``x``, a
      ``loss_fn`` that does not return a scalar (each message names the
      argument); ``TypeError`` (also a ValueError) for a non-float ``x``.

  Examples:
    >>> import jax.numpy as jnp
    >>> loss = lambda x, y: jnp.sum(x * y)
    >>> fgsm(loss, jnp.array([[0.0, 1.0]]), jnp.array([[-1., 1.]]), 0.2)
    Array([[0., 1.]], dtype=float32)
    >>> fgsm(loss, jnp.array([[0.5]]), jnp.array([[1.]]), -0.1)
    Traceback (most recent call last):
    ...
    ValueError: `epsilon` must be a finite number >= 0, got -0.1 (float).
  """
  x, epsilon, valid_range = _check_common(loss_fn, x, y, epsilon,
                                          valid_range)
  g = _grad(loss_fn, x, y)
  return jax.lax.stop_gradient(
      project(x + epsilon * jnp.sign(g), x, epsilon, valid_range))


def _iterate(loss_fn, x, y, epsilon, steps, step_size, x0, valid_range,
             decay=None):
  """``steps`` signed steps from ``x0``; momentum on l1-normalised
  gradients when ``decay`` is set (MIM)."""
  axes = tuple(range(1, x.ndim)) if x.ndim > 1 else (0,)

  def body(_, carry):
    x_adv, velocity = carry
    g = _grad(loss_fn, x_adv, y)
    if decay is not None:
      l1 = jnp.sum(jnp.abs(g), axis=axes, keepdims=True)
      velocity = decay * velocity + g / jnp.maximum(l1, _TINY)
      g = velocity
    x_adv = project(x_adv + step_size * jnp.sign(g), x, epsilon, valid_range)
    return x_adv, velocity

  x_adv, _ = jax.lax.fori_loop(0, steps, body, (x0, jnp.zeros_like(x)))
  return jax.lax.stop_gradient(x_adv)


def pgd(loss_fn: LossFn, x: jax.Array, y: Any, epsilon, *, steps: int = 7,
        step_size=None, random_start: bool = True,
        key: jax.Array | None = None,
        valid_range: tuple[float, float] | None = (0.0, 1.0)) -> jax.Array:
  """Projected gradient descent (ascent on the loss), l_inf (Madry et al.).

  ``x_{t+1} = project(x_t + step_size * sign(grad loss(x_t)))``, ``steps``
  times, from ``x_0`` uniform in the ball (clipped to the valid range) or
  ``x`` itself.

  Args:
    loss_fn: ``(x, y) -> scalar`` to maximise.
    x: inputs, leading axis the examples, inside ``valid_range``.
    y: the labels.
    epsilon: the l_inf budget (>= 0).
    steps: the number of gradient steps (>= 1).
    step_size: each step's size (> 0); default ``2.5 * epsilon / steps``
      (Madry et al.'s choice: the walk can reach the boundary from anywhere).
    random_start: start from a uniform random point of the ball.
    key: PRNG key of the random start (required with ``random_start``).
    valid_range: ``(low, high)`` of valid inputs, or ``None``.

  Returns:
    The adversarial inputs, shape and dtype of ``x``.

  Raises:
    ValueError: as :func:`fgsm`, and ``steps`` < 1, ``step_size`` <= 0 or
      non-finite, ``random_start`` without a ``key``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> loss = lambda x, y: jnp.sum(x * y)
    >>> x = jnp.full((1, 3), 0.5)
    >>> pgd(loss, x, jnp.ones((1, 3)), 0.1, steps=5, key=jax.random.key(0))
    Array([[0.6, 0.6, 0.6]], dtype=float32)
    >>> pgd(loss, x, jnp.ones((1, 3)), 0.1, steps=0, random_start=False)
    Traceback (most recent call last):
    ...
    ValueError: `steps` must be a positive int, got 0 (int).
  """
  x, epsilon, valid_range = _check_common(loss_fn, x, y, epsilon,
                                          valid_range)
  steps, step_size = _check_iterative(steps, step_size, epsilon, 2.5)
  if random_start:
    if key is None:
      raise ValueError('`key` is required with random_start=True (a '
                       'jax.random.key for the random start), got None.')
    noise = jax.random.uniform(key, x.shape, jnp.float32, -1.0, 1.0)
    x0 = project(x + epsilon * noise.astype(x.dtype), x, epsilon,
                 valid_range)
  else:
    x0 = x
  return _iterate(loss_fn, x, y, epsilon, steps, step_size, x0, valid_range)


def bim(loss_fn: LossFn, x: jax.Array, y: Any, epsilon, *, steps: int = 7,
        step_size=None,
        valid_range: tuple[float, float] | None = (0.0, 1.0)) -> jax.Array:
  """Basic iterative method (Kurakin et al.): signed steps from ``x``.

  Args:
    loss_fn: ``(x, y) -> scalar`` to maximise.
    x: inputs, leading axis the examples, inside ``valid_range``.
    y: the labels.
    epsilon: the l_inf budget (>= 0).
    steps: the number of steps (>= 1).
    step_size: each step's size (> 0); default ``epsilon / steps``.
    valid_range: ``(low, high)`` of valid inputs, or ``None``.

  Returns:
    The adversarial inputs, shape and dtype of ``x``.

  Raises:
    ValueError: as :func:`pgd`.

  Examples:
    >>> import jax.numpy as jnp
    >>> loss = lambda x, y: jnp.sum(x * y)
    >>> bim(loss, jnp.full((1, 2), 0.5), jnp.array([[1., -1.]]), 0.2,
    ...     steps=2)
    Array([[0.7, 0.3]], dtype=float32)
  """
  x, epsilon, valid_range = _check_common(loss_fn, x, y, epsilon,
                                          valid_range)
  steps, step_size = _check_iterative(steps, step_size, epsilon, 1.0)
  return _iterate(loss_fn, x, y, epsilon, steps, step_size, x, valid_range)


def mim(loss_fn: LossFn, x: jax.Array, y: Any, epsilon, *, steps: int = 7,
        step_size=None, decay=1.0,
        valid_range: tuple[float, float] | None = (0.0, 1.0)) -> jax.Array:
  """Momentum iterative method (Dong et al.): BIM with momentum.

  ``g_{t+1} = decay * g_t + grad / ||grad||_1`` (the l1 norm per example),
  ``x_{t+1} = project(x_t + step_size * sign(g_{t+1}))``, from ``x``.

  Args:
    loss_fn: ``(x, y) -> scalar`` to maximise.
    x: inputs, leading axis the examples, inside ``valid_range``.
    y: the labels.
    epsilon: the l_inf budget (>= 0).
    steps: the number of steps (>= 1).
    step_size: each step's size (> 0); default ``epsilon / steps``.
    decay: the momentum factor mu (>= 0; the paper's 1.0).
    valid_range: ``(low, high)`` of valid inputs, or ``None``.

  Returns:
    The adversarial inputs, shape and dtype of ``x``.

  Raises:
    ValueError: as :func:`pgd`, and a negative or non-finite ``decay``.

  Examples:
    >>> import jax.numpy as jnp
    >>> loss = lambda x, y: jnp.sum(x * y)
    >>> mim(loss, jnp.full((1, 2), 0.5), jnp.array([[1., -1.]]), 0.2,
    ...     steps=2)
    Array([[0.7, 0.3]], dtype=float32)
  """
  x, epsilon, valid_range = _check_common(loss_fn, x, y, epsilon,
                                          valid_range)
  steps, step_size = _check_iterative(steps, step_size, epsilon, 1.0)
  decay = _checks.finite_number('decay', decay, low=0)
  return _iterate(loss_fn, x, y, epsilon, steps, step_size, x, valid_range,
                  decay=decay)


def attack(name: str, loss_fn: LossFn, x: jax.Array, y: Any, epsilon,
           **options) -> jax.Array:
  """The attack :data:`ATTACKS` names, with its keyword ``options``.

  ``fgsm`` takes no ``steps`` / ``step_size`` / ``random_start`` / ``key``,
  and ``bim`` / ``mim`` no ``random_start`` / ``key``: such options are
  dropped for them, so one set of options serves every attack.

  Raises:
    ValueError: an unknown ``name``, or what the attack raises.

  Examples:
    >>> import jax.numpy as jnp
    >>> loss = lambda x, y: jnp.sum(x * y)
    >>> attack('fgsm', loss, jnp.full((1, 1), 0.5), jnp.ones((1, 1)), 0.25,
    ...        steps=3, random_start=False)
    Array([[0.75]], dtype=float32)
    >>> attack('cw', loss, jnp.full((1, 1), 0.5), jnp.ones((1, 1)), 0.25)
    Traceback (most recent call last):
    ...
    ValueError: `name` must be one of 'fgsm', 'pgd', 'bim', 'mim', got 'cw' (str).
  """
  _checks.choice('name', name, ATTACKS)
  fn = {'fgsm': fgsm, 'pgd': pgd, 'bim': bim, 'mim': mim}[name]
  dropped = {'fgsm': ('steps', 'step_size', 'random_start', 'key', 'decay'),
             'pgd': ('decay',),
             'bim': ('random_start', 'key', 'decay'),
             'mim': ('random_start', 'key')}[name]
  kwargs = {k: v for k, v in options.items() if k not in dropped}
  return fn(loss_fn, x, y, epsilon, **kwargs)
