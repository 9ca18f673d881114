"""Optax pieces of the AdderNet training recipe (Chen et al., 2020, Sec. 3.3).

* :func:`scale_by_adaptive_lr`: the paper's adaptive learning rate (eq. 12-13),
  one :class:`optax.GradientTransformation` that rescales every leaf it sees to
  ``eta * sqrt(k) * g / max(||g||_2, eps)``.
* :func:`increased_lr`: the paper's "increased learning rate" (ILR) ablation
  baseline, a plain constant scale.
* :func:`adder_mask`: a boolean pytree selecting exactly the adder kernels of a
  Linen or NNX model, found from the module types.
* :func:`addernet_sgd`: the paper's optimizer, ``masked(adaptive LR) ->
  weight decay -> SGD momentum -> -learning_rate``, in the order of the official
  PyTorch training.
* :func:`cosine_lr_schedule`: the official cosine schedule
  ``lr = base_lr / 2 * (1 + cos(pi * epoch / num_epochs))``.

The transforms only see the leaves a mask lets through: wrap them in
:func:`optax.masked` with :func:`adder_mask` so that BatchNorm, biases, the first
(multiplication) convolution and the classifier are never rescaled.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> from adderjax import optim
  >>> from adderjax.linen import AdderConv
  >>> class Net(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     x = nn.Conv(4, (3, 3))(x)               # first conv: not an adder
  ...     x = AdderConv(4, (3, 3), use_bias=False)(x)
  ...     return nn.Dense(2)(x.mean((1, 2)))      # classifier: not an adder
  >>> x = jnp.ones((1, 8, 8, 1))
  >>> params = jax.jit(Net().init)(jax.random.key(0), x)['params']
  >>> mask = optim.adder_mask(Net(), x)
  >>> mask['AdderConv_0']['kernel'], mask['Conv_0']['kernel']
  (True, False)
  >>> tx = optim.addernet_sgd(0.1, mask=mask)
  >>> state = jax.jit(tx.init)(params)
  >>> grads = jax.tree.map(jnp.ones_like, params)
  >>> updates, state = jax.jit(tx.update)(grads, state, params)
  >>> jax.tree.structure(updates) == jax.tree.structure(params)
  True

References:
  H. Chen, Y. Wang, C. Xu, B. Shi, C. Xu, Q. Tian, C. Xu. AdderNet: Do We
  Really Need Multiplications in Deep Learning? CVPR 2020.
  https://arxiv.org/abs/1912.13200
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import math
import warnings
from typing import Any

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from adderjax import _checks
from adderjax import introspect
from adderjax import linen as adder_linen
from adderjax import nnx as adder_nnx

__all__ = [
    'LINEN_ADDER_TYPES',
    'BRIDGE_PROBE_SHAPES',
    'NNX_ADDER_TYPES',
    'SCALINGS',
    'adder_mask',
    'addernet_sgd',
    'cosine_lr_schedule',
    'increased_lr',
    'scale_by_adaptive_lr',
]

#: Linen module classes whose ``kernel`` :func:`adder_mask` selects by default
#: (subclasses included).
LINEN_ADDER_TYPES: tuple[type, ...] = (adder_linen.AdderConv,
                                       adder_linen.AdderDense,
                                       adder_linen.AdderDenseGeneral)
#: NNX module classes whose ``kernel`` :func:`adder_mask` selects by default
#: (subclasses included).
NNX_ADDER_TYPES: tuple[type, ...] = (adder_nnx.AdderConv, adder_nnx.AdderDense,
                                     adder_nnx.AdderLinearGeneral)
#: Accepted values of ``addernet_sgd(scaling=...)``.
SCALINGS = ('adaptive', 'ilr', 'none')

_KERNEL = 'kernel'


def _traced_in_range(value: Any, *, low: float, low_open: bool = False,
                     high: float | None = None) -> jax.Array | None:
  """For a traced ``value``: a traced bool, finite and in range; else None.

  ``high`` is an open bound. Concrete values are checked by
  :mod:`adderjax._checks` instead (they raise).
  """
  if not isinstance(value, jax.core.Tracer):
    return None
  v = jnp.asarray(value)
  ok = jnp.isfinite(v) & (v > low if low_open else v >= low)
  if high is not None:
    ok = ok & (v < high)
  return ok


def _check_positive_scalar(name: str, value: Any) -> jax.Array | None:
  """Refuses ``value`` unless it is a positive finite real number.

  NumPy / JAX scalars are accepted; strings and bools are not. A traced
  value (a hyperparameter of :func:`optax.inject_hyperparams` under
  ``jax.jit``) cannot be read: its check is returned as a traced bool, for
  :func:`_nan_unless`.
  """
  _checks.finite_number(name, value, low=0, low_open=True)
  return _traced_in_range(value, low=0, low_open=True)


def _check_nonnegative_scalar(name: str, value: Any) -> jax.Array | None:
  _checks.finite_number(name, value, low=0)
  return _traced_in_range(value, low=0)


def _nan_unless(tx: optax.GradientTransformation,
                conditions: Sequence[jax.Array | None]
                ) -> optax.GradientTransformation:
  """``tx``, whose updates are NaN unless every traced condition holds.

  The jax-side check of traced hyperparameters: a value out of range cannot
  raise inside ``jax.jit``, so it makes every floating-point update NaN (as
  a diverged step, which :func:`optax.apply_if_finite` and the training
  loop's divergence check catch) instead of training with it. The state and
  its structure are ``tx``'s. Without traced conditions, ``tx`` itself.
  """
  conditions = [c for c in conditions if c is not None]
  if not conditions:
    return tx
  ok = conditions[0]
  for c in conditions[1:]:
    ok = ok & c

  def poison(u):
    if not jnp.issubdtype(u.dtype, jnp.inexact):
      return u
    return jnp.where(ok, u, jnp.asarray(jnp.nan, u.dtype))

  def update_fn(updates, state, params=None):
    updates, state = tx.update(updates, state, params)
    return jax.tree.map(poison, updates), state

  return optax.GradientTransformation(tx.init, update_fn)


def _concrete(value: Any) -> float | None:
  """``float(value)`` for a concrete number, ``None`` for a traced one.

  A hyperparameter passed through :func:`optax.inject_hyperparams` is a JAX
  array, traced inside ``jax.jit``: its value cannot be read, so the checks
  that compare it are skipped (the construction-time checks of concrete
  values stay).
  """
  if isinstance(value, jax.core.Tracer):
    return None
  return float(value)


def _static_zero(value: Any) -> bool:
  """Whether ``value`` is a Python / NumPy zero (a part can be left out).

  A JAX array (concrete or traced) never counts as a static zero: with
  :func:`optax.inject_hyperparams` the hyperparameters are concrete arrays at
  ``init`` and traced ones at ``update``, and the chain must have the same
  parts (the same state structure) in both. A part given a zero array
  computes the same numbers as the part left out.
  """
  if isinstance(value, jax.Array):
    return False
  return float(value) == 0.0


def _adaptive_leaf(g: jax.Array, eta, eps) -> jax.Array:
  """``eta * sqrt(g.size) * g / max(||g||_2, eps)`` for one leaf, same dtype."""
  if not jnp.issubdtype(g.dtype, jnp.floating):
    raise TypeError('scale_by_adaptive_lr needs floating-point gradients, got '
                    f'a leaf of dtype {g.dtype} and shape {g.shape}.')
  if g.size == 0:
    return g
  # bf16 / f16 leaves are reduced in f32; f32 and f64 keep their precision.
  cdt = jnp.promote_types(g.dtype, jnp.float32)
  x = g.astype(cdt)
  # ||g|| = m * ||g / m|| with m = max|g|: no overflow of the sum of squares
  # for huge gradients (1e30 ** 2 is inf in f32) and no underflow for tiny
  # ones. Both reductions are over the whole (global) array.
  m = jnp.max(jnp.abs(x))
  m_safe = jnp.where(m > 0, m, jnp.ones_like(m))
  unit = x / m_safe                                   # |unit| <= 1
  r = jnp.sqrt(jnp.sum(jnp.square(unit)))            # ||g|| / m, in [1, sqrt(k)]
  # max(||g||, eps) / m == max(r, eps / m): stays finite in every range.
  denom = jnp.maximum(r, jnp.asarray(eps, cdt) / m_safe)
  factor = jnp.asarray(eta, cdt) * jnp.asarray(math.sqrt(g.size), cdt) / denom
  return (unit * factor).astype(g.dtype)


def scale_by_adaptive_lr(eta: float = 0.2,
                         eps: float = 1e-12) -> optax.GradientTransformation:
  r"""The AdderNet adaptive learning rate (paper eq. 12-13).

  Every leaf ``g`` (one adder layer's filter gradient) becomes

  .. math::
    \eta \sqrt{k} \, g / \max(\lVert g \rVert_2, \epsilon)

  with ``k = g.size`` and the norm taken over the whole leaf. The global
  learning rate is applied later in the chain (see :func:`addernet_sgd`).
  Apply it to adder kernels only, through :func:`optax.masked` and
  :func:`adder_mask`.

  * The output keeps each leaf's dtype; bf16 / f16 leaves are reduced in f32.
  * The norm is computed as ``max|g| * ||g / max|g|| ||``, so gradients near
    the dtype's range (e.g. 1e30 in f32, whose square overflows) are rescaled
    correctly, and zero gradients give zero updates, never NaN.
  * No state (:class:`optax.EmptyState`); works under ``jax.jit``, with
    ``eta`` and ``eps`` traced too (:func:`optax.inject_hyperparams`; a
    traced value out of range makes the updates NaN).
  * Data parallelism: under ``jax.jit`` with ``NamedSharding`` the gradient
    leaf is a global array and its norm is the norm of the globally reduced
    gradient (XLA inserts the cross-device reduction). The official multi-GPU
    PyTorch code normalised each device's local gradient before the all-reduce;
    we do not copy that: the result does not depend on the device count. Under
    ``pmap`` / ``shard_map``, reduce the gradients (``lax.pmean``) before this
    transform.

  Args:
    eta: the paper's :math:`\eta` (the official code uses 0.2, i.e. it divides
      by 5). Positive.
    eps: lower bound on the norm (official code: 1e-12). Positive.

  Returns:
    An :class:`optax.GradientTransformation`.

  Raises:
    ValueError: if ``eta`` or ``eps`` is not a positive finite number.
    TypeError: (at update time) for a leaf that is not floating point.

  Examples:
    >>> import jax.numpy as jnp
    >>> from adderjax.optim import scale_by_adaptive_lr
    >>> tx = scale_by_adaptive_lr(eta=0.2)
    >>> g = {'kernel': jnp.array([3.0, 4.0, 0.0, 0.0])}
    >>> updates, _ = tx.update(g, tx.init(g))
    >>> updates['kernel']  # 0.2 * sqrt(4) * g / 5
    Array([0.24, 0.32, 0.  , 0.  ], dtype=float32)

  References:
    Chen et al., AdderNet: Do We Really Need Multiplications in Deep Learning?
    CVPR 2020, Sec. 3.3, eq. 12-13. https://arxiv.org/abs/1912.13200
  """
  traced = [_check_positive_scalar('eta', eta),
            _check_positive_scalar('eps', eps)]

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda g: _adaptive_leaf(g, eta, eps), updates), state

  return _nan_unless(optax.GradientTransformation(init_fn, update_fn), traced)


def increased_lr(factor: float) -> optax.GradientTransformation:
  """The paper's "increased learning rate" (ILR) ablation baseline.

  Multiplies every leaf by the constant ``factor``: used through the same mask
  as :func:`scale_by_adaptive_lr`, it gives adder layers a ``factor`` times
  larger global learning rate instead of the per-layer adaptive one. Dtypes are
  preserved; no state.

  Args:
    factor: the learning-rate multiplier for adder kernels. Positive.

  Returns:
    An :class:`optax.GradientTransformation`.

  Raises:
    ValueError: if ``factor`` is not a positive finite number.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from adderjax.optim import increased_lr
    >>> tx = optax.masked(increased_lr(10.0), {'adder': True, 'bn': False})
    >>> g = {'adder': jnp.ones(2, jnp.bfloat16), 'bn': jnp.ones(2)}
    >>> updates, _ = tx.update(g, tx.init(g))
    >>> updates['adder'], updates['bn']
    (Array([10, 10], dtype=bfloat16), Array([1., 1.], dtype=float32))

  References:
    Chen et al., AdderNet, CVPR 2020, Sec. 4.1 (ILR in Fig. 4).
    https://arxiv.org/abs/1912.13200
  """
  traced = [_check_positive_scalar('factor', factor)]

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    def leaf(g):
      cdt = jnp.promote_types(g.dtype, jnp.float32)
      return (g.astype(cdt) * jnp.asarray(factor, cdt)).astype(g.dtype)
    return jax.tree.map(leaf, updates), state

  return _nan_unless(optax.GradientTransformation(init_fn, update_fn), traced)


# ----------------------------------------------------------------------------
# Masks.


def _check_types(adder_types, default):
  if adder_types is None:
    return default
  if isinstance(adder_types, type):
    adder_types = (adder_types,)
  adder_types = tuple(adder_types)
  bad = [t for t in adder_types if not isinstance(t, type)]
  if bad or not adder_types:
    raise TypeError('adder_types must be a non-empty sequence of module '
                    f'classes, got {adder_types!r}.')
  return adder_types


def _key_name(k) -> Any:
  if isinstance(k, jax.tree_util.DictKey):
    return k.key
  if isinstance(k, jax.tree_util.GetAttrKey):
    return k.name
  if isinstance(k, jax.tree_util.SequenceKey):
    return k.idx
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return k.key
  return k


def _mask_from_paths(tree, owner_paths: dict[tuple, type], where: str):
  """True for ``tree`` leaves at ``owner + ('kernel',)``; checks every owner."""
  found = set()

  def is_box(x):
    return isinstance(x, nn.meta.AxisMetadata)

  def leaf_fn(keypath, _):
    path = tuple(_key_name(k) for k in keypath)
    if path and path[-1] == _KERNEL and path[:-1] in owner_paths:
      found.add(path[:-1])
      return True
    return False

  mask = jax.tree_util.tree_map_with_path(leaf_fn, tree, is_leaf=is_box)
  missing = [p for p in owner_paths if p not in found]
  if missing:
    p = missing[0]
    raise ValueError(
        f'adder module {owner_paths[p].__name__} at path {"/".join(map(str, p))}'
        f' has no {_KERNEL!r} parameter in {where}; adder_types must name '
        f'modules that own a {_KERNEL!r} parameter.')
  return mask


def _linen_owners(model: nn.Module, args, kwargs, adder_types, init_rngs):
  """Abstract ``model.init`` under interception: (variables, adder owners)."""
  # Every method of an adder module counts (setup included); abstract
  # evaluation: no FLOPs, no parameter memory.
  with introspect.intercept_layers(tuple(adder_types) + (nn.BatchNorm,),
                                   methods=None) as calls:
    variables = introspect.abstract_init(model, *args, init_rngs=init_rngs,
                                         **kwargs)
  owners: dict[tuple, type] = {}
  norms: dict[tuple, Any] = {}
  for call in calls:
    if isinstance(call.module, nn.BatchNorm):
      norms.setdefault(call.path, call.module)
    else:
      owners.setdefault(call.path, call.type)
  _warn_bad_batch_norm(owners, norms)
  return variables, owners


#: BatchNorm momentum (Flax convention) above which :func:`adder_mask` warns
#: for a model with adder layers: flax's default 0.99 follows the adder
#: outputs' drifting statistics too slowly (one MNIST epoch of a small adder
#: net: 11 % test accuracy with its running statistics, 89 % with batch
#: statistics; the zoo and the paper's code use 0.9, PyTorch's 0.1).
BN_MOMENTUM_WARN = 0.95


def _warn_bad_batch_norm(owners: dict[tuple, Any],
                         norms: dict[tuple, Any]) -> None:
  """Warns once about BatchNorm settings known to fail with adder layers."""
  if not owners or not norms:
    return
  slow = sorted('/'.join(map(str, p)) or '<top>'
                for p, m in norms.items()
                if float(m.momentum) > BN_MOMENTUM_WARN)
  fast = sorted('/'.join(map(str, p)) or '<top>'
                for p, m in norms.items() if m.use_fast_variance)
  problems = []
  if slow:
    problems.append(
        f'BatchNorm momentum above {BN_MOMENTUM_WARN} at {slow[:4]}'
        f'{" ..." if len(slow) > 4 else ""} (flax\'s default is 0.99): the '
        'running statistics lag the adder outputs, whose statistics drift '
        'in training, so evaluation with them can collapse (one MNIST epoch '
        'of a small adder net: 11 % vs 89 % with batch statistics); use '
        'momentum=0.9 (PyTorch\'s 0.1, the zoo\'s and the paper\'s)')
  if fast:
    problems.append(
        f'use_fast_variance=True at {fast[:4]}{" ..." if len(fast) > 4 else ""}'
        ' (flax\'s default): E[y^2] - E[y]^2 cancels in float32 on adder '
        'outputs, whose mean is far from zero; use use_fast_variance=False')
  if not problems:
    return
  warnings.warn('adderjax.optim.adder_mask: a model with adder layers has '
                + '; and '.join(problems) + '.', UserWarning, stacklevel=4)


def _linen_mask(model: nn.Module, args, kwargs, adder_types, init_rngs):
  variables, owners = _linen_owners(model, args, kwargs, adder_types,
                                    init_rngs)
  params = variables.get('params', {})
  return _mask_from_paths(params, owners, "the model's variables['params']")


#: Inputs (NHWC, batch 1, float32) tried for a Linen module wrapped in
#: ``flax.nnx.bridge.ToNNX`` whose input is not known (see :func:`adder_mask`):
#: the zoo's MNIST, CIFAR and ImageNet images.
BRIDGE_PROBE_SHAPES: tuple[tuple[int, ...], ...] = (
    (1, 28, 28, 1), (1, 32, 32, 3), (1, 224, 224, 3))


def _shape_of(leaf) -> tuple[int, ...]:
  if isinstance(leaf, nnx.Variable):
    leaf = leaf.get_value()
  if isinstance(leaf, nn.meta.AxisMetadata):
    leaf = leaf.unbox()
  return tuple(np.shape(leaf))


def _flat_shapes(tree) -> dict[tuple, tuple[int, ...]]:
  def is_leaf(x):
    return isinstance(x, (nnx.Variable, nn.meta.AxisMetadata))
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {tuple(_key_name(k) for k in path): _shape_of(leaf)
          for path, leaf in flat}


def _bridge_candidates(modules: dict[tuple, Any], path: tuple, explicit):
  """(args, kwargs, description) inputs to try for the ToNNX at ``path``."""
  if explicit is not None:
    return [explicit + ('the example inputs given to adder_mask',)]
  candidates = []
  for i in range(len(path), -1, -1):
    spec = getattr(modules.get(path[:i]), 'example_input', None)
    if isinstance(spec, jax.ShapeDtypeStruct):
      where = '/'.join(map(str, path[:i])) or 'the model'
      candidates.append(((spec,), {}, f'example_input of {where} {spec}'))
  for shape in BRIDGE_PROBE_SHAPES:
    spec = jax.ShapeDtypeStruct(shape, jnp.float32)
    candidates.append(((spec,), {}, f'a float32 input of shape {shape}'))
  return candidates


def _bridge_owners(node: nnx.Module, path: tuple, modules: dict[tuple, Any],
                   linen_types, explicit, init_rngs) -> dict[tuple, type]:
  """Adder owners inside the Linen module of a ``ToNNX`` node at ``path``.

  The wrapped module's ``init`` is run abstractly under interception on each
  candidate input until one reproduces the node's parameters exactly
  (same paths, same shapes): the recorded Linen scope paths are then the
  paths of the node's ``nnx.Param`` state (``ToNNX`` keeps Linen's
  ``params`` tree as its attributes).
  """
  target = _flat_shapes(nnx.state(node, nnx.Param))
  if not target or not linen_types:
    return {}
  linen_module = node.to_nnx__module
  where = '/'.join(map(str, path)) or 'the model'
  tried = []
  for args, kwargs, desc in _bridge_candidates(modules, path, explicit):
    try:
      variables, owners = _linen_owners(linen_module, args, kwargs,
                                        linen_types, init_rngs)
    except Exception as e:  # pylint: disable=broad-except
      if explicit is not None:
        raise ValueError(
            f'adder_mask: the Linen module {type(linen_module).__name__} '
            f'wrapped by nnx.bridge.ToNNX at {where} failed to initialise '
            f'on {desc}: {type(e).__name__}: {e}') from e
      tried.append(f'{desc} (init failed: {type(e).__name__})')
      continue
    if _flat_shapes(variables.get('params', {})) == target:
      return owners
    tried.append(f'{desc} (other parameter shapes)')
  raise ValueError(
      f'adder_mask cannot find the adder layers of the Linen module '
      f'{type(linen_module).__name__} wrapped by nnx.bridge.ToNNX at {where}: '
      f'no input tried reproduces its parameters ({"; ".join(tried)}). Give '
      'the wrapper or a module around it an `example_input` attribute (a '
      "jax.ShapeDtypeStruct of the Linen module's input), call "
      'adder_mask(tonnx_module, example_input, **example_kwargs) on the '
      'ToNNX module itself, or build the model with '
      "adderjax.models.create_model(..., api='nnx').")


def _nnx_mask(model: nnx.Module, adder_types, linen_types=(),
              explicit=None, init_rngs=None):
  owners: dict[tuple, type] = {}
  modules = {tuple(path): node for path, node in nnx.iter_modules(model)}
  norms = {}
  for path, node in modules.items():
    if isinstance(node, nnx.BatchNorm):
      norms[path] = node
    if isinstance(node, adder_types):
      owners.setdefault(path, type(node))
    elif isinstance(node, nnx.bridge.ToNNX):
      for p, t in _bridge_owners(node, path, modules, linen_types, explicit,
                                 init_rngs).items():
        owners.setdefault(path + p, t)
  _warn_bad_batch_norm(owners, norms)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  return _mask_from_paths(params, owners, 'nnx.state(model, nnx.Param)')


def adder_mask(model: nn.Module | nnx.Module,
               *example_args: Any,
               adder_types: Sequence[type] | type | None = None,
               init_rngs: Any = None,
               **example_kwargs: Any):
  """A boolean pytree that is True exactly at the adder layers' kernels.

  Adder layers are found from the module types, not from parameter names: every
  instance of ``adder_types`` (subclasses included) contributes its own
  ``kernel`` parameter. Everything else (the first multiplication convolution,
  BatchNorm scales and biases, every bias, the classifier) is False. Use the
  result with :func:`optax.masked` or as ``addernet_sgd(mask=...)``.

  * Linen: ``adder_mask(model, *example_args, **example_kwargs)`` runs
    ``model.init(init_rngs, *example_args, **example_kwargs)`` abstractly
    (:func:`jax.eval_shape`, nothing is computed or allocated) under
    :func:`flax.linen.intercept_methods`, records the scope path of every
    adder module that is called and returns a tree of bools shaped like
    ``variables['params']`` (a boxed ``nn.Partitioned`` parameter counts as one
    leaf). The example inputs may be arrays or :class:`jax.ShapeDtypeStruct`.
  * NNX: ``adder_mask(model)`` walks the module graph and returns a tree of
    bools shaped like ``nnx.as_pure(nnx.state(model, nnx.Param))``; it works
    with ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and with abstract models
    (``nnx.eval_shape``).
  * Linen inside NNX: a Linen module wrapped by ``flax.nnx.bridge.ToNNX``
    (anywhere in the NNX graph) contributes the kernels of its Linen adder
    layers (``LINEN_ADDER_TYPES``, or the Linen classes in ``adder_types``),
    at their paths in ``nnx.state(model, nnx.Param)`` (the wrapper keeps the
    Linen ``params`` tree). They are found as for Linen, by an abstract
    ``init`` of the wrapped module, on an input that must reproduce the
    wrapper's parameters exactly (same paths and shapes): the example inputs
    passed here (allowed when ``model`` itself is the ``ToNNX`` module), else
    an ``example_input`` attribute (a :class:`jax.ShapeDtypeStruct`) of the
    wrapper or of a module around it (the zoo's NNX models,
    ``create_model(..., api='nnx')``, have one), else one image of each
    shape in :data:`BRIDGE_PROBE_SHAPES` (the zoo's MNIST, CIFAR and ImageNet
    inputs) with the module's default keyword arguments.

  Modules inside ``setup``, ``nn.remat`` and other lifted transforms are found
  with their real paths. Kernels stacked by ``nn.scan`` / ``nn.vmap`` (or an
  NNX module built under ``nnx.vmap``) are one leaf, so
  :func:`scale_by_adaptive_lr` would normalise the whole stack at once rather
  than each layer.

  Args:
    model: a ``flax.linen.Module`` (unbound) or a ``flax.nnx.Module``.
    *example_args: Linen (or a ``ToNNX`` model) only: positional inputs for
      ``model.init`` (of the wrapped Linen module).
    adder_types: module classes that count as adder layers. Default:
      :data:`LINEN_ADDER_TYPES` or :data:`NNX_ADDER_TYPES`. To add a model
      zoo's own layer type, pass e.g. ``LINEN_ADDER_TYPES + (MyAdder,)``; each
      must own a parameter named ``kernel``. (This keyword is not forwarded to
      the model.)
    init_rngs: Linen only: the ``rngs`` argument of ``model.init`` (default
      ``jax.random.key(0)``; pass a dict such as ``{'params': k, 'dropout': k}``
      if the model draws other streams at init).
    **example_kwargs: Linen only: keyword inputs for ``model.init`` (e.g.
      ``train=False``).

  Returns:
    A pytree of Python bools with the structure of the model's parameters.

  Raises:
    TypeError: if ``model`` is neither a Linen nor an NNX module, if example
      inputs are given for an NNX model other than an ``nnx.bridge.ToNNX``,
      or if ``adder_types`` is not a sequence of classes.
    ValueError: if an adder module has no ``kernel`` parameter, or if no
      input reproduces the parameters of a ``ToNNX``-wrapped Linen module.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from adderjax import optim
    >>> from adderjax.nnx import AdderConv
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.stem = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    ...     self.adder = AdderConv(4, 4, (3, 3), rngs=rngs)
    ...     self.bn = nnx.BatchNorm(4, momentum=0.9, use_fast_variance=False,
    ...                             rngs=rngs)
    >>> model = nnx.eval_shape(lambda: Net(nnx.Rngs(0)))  # or a real model
    >>> mask = optim.adder_mask(model)
    >>> sorted(path for path, m in nnx.to_flat_state(mask) if m)
    [('adder', 'kernel')]

    A Linen model inside ``nnx.bridge.ToNNX`` (its input is given here):

    >>> import flax.linen as nn
    >>> from adderjax.linen import AdderDense
    >>> class Mlp(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return nn.Dense(2)(AdderDense(4, use_bias=False)(x))
    >>> x = jnp.ones((1, 3))
    >>> wrapped = nnx.bridge.ToNNX(Mlp(), rngs=nnx.Rngs(0)).lazy_init(x)
    >>> mask = optim.adder_mask(wrapped, x)
    >>> sorted(path for path, m in nnx.to_flat_state(mask) if m)
    [('AdderDense_0', 'kernel')]

  References:
    Chen et al., AdderNet, CVPR 2020, Sec. 3.3: only adder filters get the
    adaptive learning rate. https://arxiv.org/abs/1912.13200
  """
  if isinstance(model, nn.Module):
    types = _check_types(adder_types, LINEN_ADDER_TYPES)
    return _linen_mask(model, example_args, example_kwargs, types, init_rngs)
  if isinstance(model, nnx.Module):
    given = bool(example_args or example_kwargs or init_rngs is not None)
    if given and not isinstance(model, nnx.bridge.ToNNX):
      raise TypeError(
          'adder_mask(nnx_model) takes no example inputs or init_rngs (the NNX '
          'model already holds its parameters; only an nnx.bridge.ToNNX model '
          'takes the example inputs of the Linen module it wraps); got '
          f'{len(example_args)} positional and keywords '
          f'{sorted(example_kwargs) + (["init_rngs"] if init_rngs else [])}.')
    types = _check_types(adder_types, NNX_ADDER_TYPES)
    if adder_types is None:
      linen_types = LINEN_ADDER_TYPES
    else:
      linen_types = tuple(t for t in types if issubclass(t, nn.Module))
    explicit = (example_args, example_kwargs) if given else None
    return _nnx_mask(model, types, linen_types, explicit, init_rngs)
  raise TypeError('adder_mask needs a flax.linen.Module or a flax.nnx.Module, '
                  f'got {type(model).__name__}: {model!r}.')


# ----------------------------------------------------------------------------
# The paper's optimizer and schedule.


#: Step counts at which :func:`addernet_sgd` evaluates a schedule up front.
SCHEDULE_CHECK_STEPS = (0, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)


def _check_schedule(schedule: Callable[[Any], Any]) -> None:
  """Raises ``ValueError`` if ``schedule`` is negative or not finite.

  A schedule is a function of the traced step count, so it cannot be checked
  inside the train step; it is evaluated here at
  :data:`SCHEDULE_CHECK_STEPS`, which catches a wrong sign or a NaN.
  """
  for step in SCHEDULE_CHECK_STEPS:
    try:
      value = np.asarray(jax.device_get(schedule(jnp.asarray(step))))
    except Exception:  # pylint: disable=broad-except
      return  # Not evaluable eagerly: left to the user.
    if value.size != 1:
      raise ValueError(f'the learning-rate schedule must return a scalar, got '
                       f'shape {value.shape} at step {step}.')
    v = float(value.reshape(()))
    if not math.isfinite(v) or v < 0:
      raise ValueError(f'the learning-rate schedule must be a non-negative '
                       f'finite number at every step, got {v!r} at step '
                       f'{step}.')


def _check_mask_against(name: str, mask: Any, params: Any) -> Any:
  """The mask tree for ``params``: bool leaves, a prefix of ``params``."""
  tree = mask(params) if callable(mask) else mask
  _checks.bool_mask(name, tree)
  hint = ''
  if (isinstance(params, Mapping) and 'params' in params
      and not (isinstance(tree, Mapping) and 'params' in tree)):
    hint = ("was the optimizer given the whole variables dict? pass "
            "variables['params']")
  # Only against real parameters: optax.tree_map_params initialises with a
  # placeholder object standing for the whole tree.
  leaves = jax.tree_util.tree_leaves(params)
  if leaves and all(hasattr(leaf, 'shape') for leaf in leaves):
    _checks.structure_prefix(name, tree, params, hint=hint)
  return tree


def _checked_mask(inner: optax.GradientTransformation, mask: Any,
                  name: str, scaling: str | None = None
                  ) -> optax.GradientTransformation:
  """``inner``, checking ``mask`` against the parameters at ``init``.

  The mask's leaves must be bools and its structure a prefix of the
  parameters' (else the error says ``name`` and the first differing path);
  with ``scaling``, warns when the mask selects no parameter.
  """

  def init(params):
    tree = _check_mask_against(name, mask, params)
    if scaling is not None:
      try:
        selected = any(bool(np.any(leaf))
                       for leaf in jax.tree_util.tree_leaves(tree))
      except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        selected = True  # Traced: cannot tell.
      if not selected:
        warnings.warn(
            f"addernet_sgd(scaling={scaling!r}): the mask selects no "
            'parameter, so no adder kernel gets the scaling and this is plain '
            'SGD. Build the mask with adderjax.optim.adder_mask(model, '
            'example_input).', stacklevel=2)
    return inner.init(params)

  return optax.GradientTransformation(init, inner.update)


def addernet_sgd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    mask: Any = None,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    eta: float = 0.2,
    eps: float = 1e-12,
    nesterov: bool = False,
    scaling: str = 'adaptive',
    ilr_factor: float | None = None,
    weight_decay_mask: Any = None,
) -> optax.GradientTransformation:
  """The AdderNet optimizer: adaptive LR on adder kernels, then SGD momentum.

  The chain, in the order of the official PyTorch training (the adaptive LR
  is applied to the gradient before ``torch.optim.SGD`` sees it)::

    g  <- masked(scale_by_adaptive_lr(eta, eps), mask)(g)   # adder kernels
    d  <- g + weight_decay * p                               # every parameter
    buf <- momentum * buf + d                                # optax.trace
    u  <- -learning_rate(step) * buf                         # (nesterov: d + momentum * buf)

  i.e. PyTorch's ``d_p = grad + wd * p; buf = momentum * buf + d_p;
  p -= lr * buf`` (no dampening). With ``scaling='ilr'`` the masked transform is
  :func:`increased_lr` (``ilr_factor``); with ``scaling='none'`` there is none.
  Under data parallelism with ``jax.jit`` + ``NamedSharding`` the adaptive
  norm is that of the global gradient (see :func:`scale_by_adaptive_lr`).
  With sharded parameters, create the state with their shardings (an eager
  ``tx.init(params)``, or ``jax.jit(tx.init, out_shardings=...)`` built with
  :func:`optax.tree_map_params`): with Auto mesh axes a bare
  ``jax.jit(tx.init)`` returns a replicated momentum buffer, and the second
  train step then recompiles for the sharded one the first step returns.

  It composes with optax's wrappers as optax's own transforms do
  (:func:`optax.MultiSteps`, :func:`optax.apply_if_finite`, ...), and every
  numeric argument (``learning_rate``, ``momentum``, ``weight_decay``,
  ``eta``, ``eps``, ``ilr_factor``) may be traced, so
  ``optax.inject_hyperparams(addernet_sgd)(learning_rate=0.1, mask=mask)``
  works under ``jax.jit`` (pass ``static_args='mask'`` for a callable mask,
  which ``inject_hyperparams`` would take for a schedule). Concrete values
  are checked when the transform is built (``inject_hyperparams``: at an
  eager ``init``); a traced value out of range cannot raise, so it makes
  every update NaN. A momentum or weight decay given as a JAX array keeps
  its part of the chain even at 0 (the same numbers as without it), so that
  ``init`` and ``update`` see the same state structure.

  Args:
    learning_rate: a float or an optax schedule of the step count (e.g.
      :func:`cosine_lr_schedule` or :func:`optax.cosine_decay_schedule`).
    mask: which leaves are adder kernels: a boolean pytree (prefix) of the
      parameters or a callable ``params -> pytree``, usually
      :func:`adder_mask`. Required unless ``scaling='none'``.
    momentum: SGD momentum (paper: 0.9); 0 disables the momentum buffer.
    weight_decay: L2 coefficient added to the gradient (CIFAR: 5e-4, ImageNet:
      1e-4).
    eta: adaptive-LR :math:`\\eta` (0.2 in the official code).
    eps: lower bound of the adaptive-LR norm.
    nesterov: Nesterov momentum (the paper does not use it).
    scaling: ``'adaptive'`` (paper), ``'ilr'`` (increased-LR baseline) or
      ``'none'`` (plain SGD baseline).
    ilr_factor: the ILR multiplier; required for ``scaling='ilr'``.
    weight_decay_mask: optional mask for the weight decay (default: all
      parameters, as PyTorch's ``SGD(weight_decay=...)``).

  Returns:
    An :class:`optax.GradientTransformation` (a chain).

  Raises:
    ValueError: on an unknown ``scaling``, a missing ``mask`` or
      ``ilr_factor``, out-of-range hyperparameters, or a mask whose leaves
      are not bools; at ``init``, a mask that does not match the parameters'
      structure (the message shows the first differing path).
    TypeError: a hyperparameter that is not a number (e.g. a string); the
      error is also a ``ValueError``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from adderjax.optim import addernet_sgd, cosine_lr_schedule
    >>> params = {'adder': {'kernel': jnp.ones((3, 3, 2, 2))},
    ...           'bn': {'scale': jnp.ones(2)}}
    >>> mask = {'adder': {'kernel': True}, 'bn': {'scale': False}}
    >>> tx = addernet_sgd(cosine_lr_schedule(0.1, num_epochs=400,
    ...                                      steps_per_epoch=196), mask=mask)
    >>> state = tx.init(params)
    >>> grads = {'adder': {'kernel': jnp.full((3, 3, 2, 2), 1e-4)},
    ...          'bn': {'scale': jnp.zeros(2)}}
    >>> updates, state = tx.update(grads, state, params)
    >>> round(float(updates['adder']['kernel'][0, 0, 0, 0]), 7)  # -0.1 * 0.2005
    -0.02005
    >>> round(float(updates['bn']['scale'][0]), 7)               # -0.1 * 5e-4
    -5e-05

    The learning rate as a hyperparameter of the state (logging, sweeps):

    >>> import jax, optax
    >>> tx = optax.inject_hyperparams(addernet_sgd)(learning_rate=0.1,
    ...                                             mask=mask)
    >>> state = tx.init(params)
    >>> updates, state = jax.jit(tx.update)(grads, state, params)
    >>> round(float(updates['bn']['scale'][0]), 7)
    -5e-05
    >>> state.hyperparams['learning_rate'] = 0.2  # takes effect next step

  References:
    Chen et al., AdderNet, CVPR 2020, Sec. 3.3 and 4 (SGD, momentum 0.9,
    weight decay 5e-4, cosine learning rate). https://arxiv.org/abs/1912.13200
  """
  _checks.choice('scaling', scaling, SCALINGS)
  # Traced values (inject_hyperparams under jit) are checked jax-side.
  traced = [_check_nonnegative_scalar('momentum', momentum)]
  momentum_value = _concrete(momentum)  # None: traced
  if momentum_value is None:
    traced.append(_traced_in_range(momentum, low=0, high=1))
  elif not momentum_value < 1:
    raise ValueError(f'momentum must be in [0, 1) (SGD momentum diverges at '
                     f'1 and above), got {momentum!r}.')
  traced.append(_check_nonnegative_scalar('weight_decay', weight_decay))
  if callable(learning_rate):
    _check_schedule(learning_rate)
  else:
    traced.append(_check_nonnegative_scalar('learning_rate', learning_rate))
  if nesterov and momentum_value == 0:
    raise ValueError('nesterov=True needs momentum > 0, got '
                     f'momentum={momentum!r}.')
  if nesterov and momentum_value is None:
    traced.append(_traced_in_range(momentum, low=0, low_open=True))
  if scaling != 'none' and mask is None:
    raise ValueError(
        f"scaling={scaling!r} needs mask= (which leaves are adder kernels), "
        'e.g. mask=adderjax.optim.adder_mask(model, example_input); pass '
        "scaling='none' for plain SGD.")
  if not isinstance(nesterov, (bool, np.bool_)):
    raise _checks.ArgumentTypeError(
        f'`nesterov` must be a bool, got {_checks.describe(nesterov)}.')
  for mask_name, value in (('mask', mask),
                           ('weight_decay_mask', weight_decay_mask)):
    if value is not None and not callable(value):
      _checks.bool_mask(mask_name, value)
  if scaling == 'ilr' and ilr_factor is None:
    raise ValueError("scaling='ilr' needs ilr_factor= (the LR multiplier of "
                     'adder layers).')
  if scaling != 'ilr' and ilr_factor is not None:
    raise ValueError(f'ilr_factor={ilr_factor!r} is only used with '
                     f"scaling='ilr', got scaling={scaling!r}.")
  # Checked here too (not only by the masked transform): the error names
  # this function's argument, and a traced value out of range makes every
  # update NaN, not only the masked ones. eta and eps are checked with every
  # scaling (a wrong value is refused even where it is unused).
  traced += [_check_positive_scalar('eta', eta),
             _check_positive_scalar('eps', eps)]
  if scaling == 'ilr':
    traced.append(_check_positive_scalar('ilr_factor', ilr_factor))

  parts = []
  if scaling == 'adaptive':
    parts.append(_checked_mask(
        optax.masked(scale_by_adaptive_lr(eta=eta, eps=eps), mask), mask,
        'mask', scaling))
  elif scaling == 'ilr':
    parts.append(_checked_mask(
        optax.masked(increased_lr(ilr_factor), mask), mask, 'mask', scaling))
  if not _static_zero(weight_decay):
    decay = optax.add_decayed_weights(weight_decay)
    if weight_decay_mask is not None:
      decay = _checked_mask(optax.masked(decay, weight_decay_mask),
                            weight_decay_mask, 'weight_decay_mask')
    parts.append(decay)
  if not _static_zero(momentum):
    parts.append(optax.trace(decay=momentum, nesterov=nesterov))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return _nan_unless(optax.chain(*parts), traced)


def cosine_lr_schedule(base_lr: float,
                       num_epochs: int,
                       steps_per_epoch: int = 1,
                       *,
                       per_epoch: bool = True) -> Callable[[Any], jax.Array]:
  """The official AdderNet cosine schedule, as an optax schedule of the step.

  ``lr = base_lr / 2 * (1 + cos(pi * epoch / num_epochs))`` with
  ``epoch = step // steps_per_epoch`` (the official CIFAR code sets the LR once
  per epoch: ``0.05 * (1 + cos(pi * epoch / 400))``). It stays at 0 after
  ``num_epochs``. With ``per_epoch=False`` the decay is smooth per step,
  i.e. ``optax.cosine_decay_schedule(base_lr, num_epochs * steps_per_epoch)``,
  which is equally fine for training.

  Args:
    base_lr: the initial learning rate (CIFAR and MNIST: 0.1).
    num_epochs: epochs to decay over (CIFAR: 400, ImageNet: 150, MNIST: 50).
    steps_per_epoch: optimizer steps per epoch (e.g. ``ceil(50000 / 256)``).
    per_epoch: staircase per epoch (official) or smooth per step.

  Returns:
    A schedule: a callable from the step count to the learning rate.

  Raises:
    ValueError: on a negative ``base_lr`` or non-positive counts.

  Examples:
    >>> from adderjax.optim import cosine_lr_schedule
    >>> sched = cosine_lr_schedule(0.1, num_epochs=400, steps_per_epoch=196)
    >>> [round(float(sched(s)), 6) for s in (0, 195, 196, 200 * 196, 10**6)]
    [0.1, 0.1, 0.099998, 0.05, 0.0]

  References:
    Chen et al., AdderNet, CVPR 2020, Sec. 4.1 (cosine learning rate).
    https://arxiv.org/abs/1912.13200
  """
  _check_nonnegative_scalar('base_lr', base_lr)
  for name, v in (('num_epochs', num_epochs),
                  ('steps_per_epoch', steps_per_epoch)):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
      raise ValueError(f'{name} must be a positive int, got {v!r}.')
  if not per_epoch:
    return optax.cosine_decay_schedule(base_lr, num_epochs * steps_per_epoch)

  def schedule(count):
    epoch = jnp.minimum(jnp.asarray(count) // steps_per_epoch, num_epochs)
    frac = epoch.astype(jnp.float32) / num_epochs
    # 0.5 * (1 + cos(pi f)) == cos(pi f / 2) ** 2, without the cancellation
    # of 1 + cos near the end of training.
    return jnp.asarray(base_lr, jnp.float32) * jnp.square(
        jnp.cos(0.5 * jnp.pi * frac))

  return schedule
