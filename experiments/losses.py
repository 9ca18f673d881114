"""What a train step minimises: the task loss and pluggable extra terms.

A train step (:func:`experiments.steps.make_train_step`) runs the model and
hands its outputs to an :class:`Objective`: the task loss (cross-entropy of
the logits against integer labels, the paper's) plus any number of weighted
extra terms. A new training method that only changes the loss (label
smoothing, a regulariser on the features, a teacher's soft targets computed
inside the step) is a new :class:`LossTerm` registered here and named in the
config; it never edits the loop (:mod:`experiments.train`) or the step.

A term sees a :class:`StepOutputs`: the logits, the labels, the normalised
images, the model's ``intermediates`` collection (whatever the model ``sow``-ed
in training mode) and the step's PRNG key.

Examples:
  >>> import jax.numpy as jnp
  >>> out = StepOutputs(logits=jnp.array([[2., 0.], [0., 2.]]),
  ...                   labels=jnp.array([0, 1]))
  >>> loss, metrics = Objective()(out)
  >>> round(float(loss), 4), sorted(metrics)
  (0.1269, [])
  >>> l2 = LossTerm('logit_l2', 0.5, lambda o: jnp.mean(o.logits ** 2))
  >>> loss, metrics = Objective(terms=(l2,))(out)
  >>> round(float(loss), 4), sorted(metrics)
  (1.1269, ['loss/logit_l2'])
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from adderjax import slac


@dataclasses.dataclass(frozen=True)
class StepOutputs:
  """What the model produced in one training step (the terms' input).

  Attributes:
    logits: ``(batch, classes)`` model outputs.
    labels: ``(batch,)`` integer labels.
    images: the normalised input batch (``None`` where not needed).
    intermediates: the model's ``intermediates`` collection (``{}`` unless
      the model sows values).
    key: the step's PRNG key (``None`` where the step has none).
  """
  logits: jax.Array
  labels: jax.Array
  images: jax.Array | None = None
  intermediates: Any = dataclasses.field(default_factory=dict)
  key: jax.Array | None = None


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of ``logits`` against integer ``labels``.

  The logits are cast to float32 first (bf16 models included).

  Examples:
    >>> import math, jax.numpy as jnp
    >>> v = cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))
    >>> math.isclose(float(v), math.log(4), rel_tol=1e-6)
    True
  """
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels).mean()


def classification_metrics(logits: jax.Array, labels: jax.Array,
                           mask: jax.Array | None = None) -> dict:
  """Sums of cross-entropy, top-1 and top-5 hits, and the example count.

  Examples:
    >>> import jax.numpy as jnp
    >>> m = classification_metrics(jnp.array([[2., 1., 0.], [0., 1., 2.]]),
    ...                            jnp.array([0, 0]))
    >>> float(m['top1']), float(m['count'])
    (1.0, 2.0)
  """
  logits = logits.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  k = min(5, logits.shape[-1])
  topk = jax.lax.top_k(logits, k)[1]
  top1 = (topk[:, 0] == labels).astype(jnp.float32)
  top5 = jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)
  w = (jnp.ones_like(loss) if mask is None else mask.astype(jnp.float32))
  return {'loss': jnp.sum(loss * w), 'top1': jnp.sum(top1 * w),
          'top5': jnp.sum(top5 * w), 'count': jnp.sum(w)}


@dataclasses.dataclass(frozen=True)
class LossTerm:
  """One weighted extra term of the objective.

  Attributes:
    name: the term's name; its (unweighted) value is reported as the metric
      ``loss/<name>`` (a per-step mean, summed over the devices like the
      other metrics and divided by the example count when logged).
    weight: the factor the term enters the loss with.
    fn: ``StepOutputs -> scalar``.
  """
  name: str
  weight: float
  fn: Callable[[StepOutputs], jax.Array]

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f'LossTerm name must be a non-empty str, got '
                       f'{self.name!r}.')
    if (isinstance(self.weight, bool) or
        not isinstance(self.weight, (int, float))):
      raise ValueError(f'LossTerm {self.name!r}: weight must be a number, '
                       f'got {self.weight!r}.')
    if not callable(self.fn):
      raise ValueError(f'LossTerm {self.name!r}: fn must be callable, got '
                       f'{self.fn!r}.')


@dataclasses.dataclass(frozen=True)
class Objective:
  """The task loss plus weighted extra terms: ``outputs -> (loss, metrics)``.

  Attributes:
    task: ``(logits, labels) -> scalar`` (default :func:`cross_entropy`).
    terms: extra :class:`LossTerm` s, added as ``weight * term``.
    collect_intermediates: the step runs the model with the
      ``intermediates`` collection mutable and passes it to the terms.
  """
  task: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy
  terms: tuple[LossTerm, ...] = ()
  collect_intermediates: bool = False

  def __call__(self, out: StepOutputs) -> tuple[jax.Array, dict]:
    loss = self.task(out.logits, out.labels)
    metrics = {}
    for term in self.terms:
      value = jnp.asarray(term.fn(out), jnp.float32)
      if value.shape != ():
        raise ValueError(f'loss term {term.name!r} returned shape '
                         f'{value.shape}; a term must be a scalar.')
      loss = loss + term.weight * value
      metrics[f'loss/{term.name}'] = value
    return loss, metrics


#: Extra terms a config can name: ``name -> factory(**options) -> fn``.
TERMS: dict[str, Callable[..., Callable[[StepOutputs], jax.Array]]] = {}


def register_term(name: str):
  """Decorator: makes a term factory nameable from a config.

  Examples:
    >>> @register_term('zero_example')
    ... def _zero(**options):
    ...   return lambda out: 0.0 * out.logits.sum()
    >>> 'zero_example' in TERMS
    True
    >>> del TERMS['zero_example']
  """
  def deco(factory):
    if name in TERMS:
      raise ValueError(f'loss term {name!r} is registered already.')
    TERMS[name] = factory
    return factory
  return deco


@register_term('logit_l2')
def _logit_l2():
  """Mean squared logit (a small regulariser; also the test term)."""
  return lambda out: jnp.mean(jnp.square(out.logits.astype(jnp.float32)))


@register_term('slac_nll')
def _slac_nll():
  """SLAC's ``L_nll``: ``-log f_y(x)`` of the head's class densities.

  Reads the values the SLAC head (``model.overrides.head='slac'``) sows;
  see :func:`adderjax.slac.nll_loss`. The paper's weight is 0.01.
  """
  def fn(out: StepOutputs) -> jax.Array:
    return slac.nll_loss(slac.find_sown(out.intermediates)['log_density'],
                         out.labels)
  fn.needs_intermediates = True
  return fn


@register_term('slac_ac')
def _slac_ac():
  """SLAC's ``L_ac``: the skew directions aligned with the class distances.

  Reads the head's ``mu``, ``sigma_inv``, ``gamma``; see
  :func:`adderjax.slac.ac_loss`. The paper's weight is 0.1.
  """
  def fn(out: StepOutputs) -> jax.Array:
    sown = slac.find_sown(out.intermediates)
    return slac.ac_loss(sown['mu'], sown['sigma_inv'], sown['gamma'])
  fn.needs_intermediates = True
  return fn


def parse_terms(spec: str) -> list[tuple[str, float]]:
  """``'name=weight,...'`` (``config.loss_terms``) -> ``[(name, weight)]``.

  Raises:
    ValueError: a malformed entry, an unknown name or a weight that is not
      a finite number.

  Examples:
    >>> parse_terms('logit_l2=0.01')
    [('logit_l2', 0.01)]
    >>> parse_terms('')
    []
  """
  out = []
  for item in filter(None, (t.strip() for t in (spec or '').split(','))):
    name, eq, weight = item.partition('=')
    name = name.strip()
    if not eq or not name:
      raise ValueError(f'loss_terms entry {item!r}: use name=weight, e.g. '
                       "'logit_l2=0.01'.")
    if name not in TERMS:
      raise ValueError(f'loss_terms entry {item!r}: unknown term {name!r}; '
                       f'registered terms: {sorted(TERMS)}.')
    try:
      value = float(weight)
    except ValueError:
      value = float('nan')
    if value != value or value in (float('inf'), float('-inf')):
      raise ValueError(f'loss_terms entry {item!r}: the weight must be a '
                       f'finite number, got {weight.strip()!r}.')
    out.append((name, value))
  return out


def objective_from_spec(spec: str = '') -> Objective:
  """The :class:`Objective` of ``config.loss_terms`` (cross-entropy + terms).

  Raises:
    ValueError: see :func:`parse_terms`.

  Examples:
    >>> obj = objective_from_spec('logit_l2=0.1')
    >>> [(t.name, t.weight) for t in obj.terms]
    [('logit_l2', 0.1)]
  """
  terms = tuple(LossTerm(name, weight, TERMS[name]())
                for name, weight in parse_terms(spec))
  return Objective(terms=terms,
                   collect_intermediates=any(
                       getattr(t.fn, 'needs_intermediates', False)
                       for t in terms))
