"""Per-parameter learning-rate factors: ``config.optimizer.lr_scales``.

``'name=factor,...'``: every parameter whose path holds a component equal to
``name`` (e.g. ``'sigma'`` matches ``params['fc3']['sigma']``, not
``'log_sigma'``) has its update multiplied by ``factor``, after the whole
optimizer chain. With SGD (momentum and weight decay included) that is the
same as giving those parameters ``factor`` times the learning rate, as a
PyTorch parameter group with its own ``lr`` would; ``factor=0`` freezes
them. A parameter matched by several names gets the product of their
factors. The transform is ``optax.masked(optax.scale(factor), mask)`` per
name, chained after the optimizer (:func:`experiments.experiment.create_optimizer`);
an empty spec adds nothing, so the optimizer (and its state) is unchanged.

Examples:
  >>> import jax.numpy as jnp, optax
  >>> params = {'fc': {'mu': jnp.ones(2), 'sigma': jnp.ones(2)}}
  >>> tx = optax.chain(optax.sgd(1.0), scale_updates(params, 'sigma=0.01'))
  >>> updates, _ = tx.update(params, tx.init(params))
  >>> {k: [round(float(u), 6) for u in v] for k, v in updates['fc'].items()}
  {'mu': [-1.0, -1.0], 'sigma': [-0.01, -0.01]}
"""

from __future__ import annotations

import math
from typing import Any

import jax
import optax

PyTree = Any


def parse_lr_scales(spec: str) -> list[tuple[str, float]]:
  """``'name=factor,...'`` -> ``[(name, factor)]``.

  Args:
    spec: comma-separated ``name=factor`` entries (``''``: none); ``name``
      a parameter path component, ``factor`` a finite number >= 0.

  Returns:
    The entries in order.

  Raises:
    ValueError: a malformed entry, a factor that is not a finite number
      >= 0, or a name given twice (the message names the entry).

  Examples:
    >>> parse_lr_scales('sigma=0.01, gamma=0')
    [('sigma', 0.01), ('gamma', 0.0)]
    >>> parse_lr_scales('')
    []
    >>> parse_lr_scales('sigma')
    Traceback (most recent call last):
    ...
    ValueError: lr_scales entry 'sigma': use name=factor, e.g. 'sigma=0.01'.
  """
  return [(name, factor) for name, factor, _ in _parse(spec)]


def _parse(spec: str) -> list[tuple[str, float, str]]:
  """``[(name, factor, entry text)]``; see :func:`parse_lr_scales`."""
  if not isinstance(spec, str):
    raise ValueError(f"lr_scales must be a str 'name=factor,...', got "
                     f'{spec!r} ({type(spec).__name__}).')
  out = []
  for item in filter(None, (t.strip() for t in spec.split(','))):
    name, eq, factor = item.partition('=')
    name = name.strip()
    if not eq or not name:
      raise ValueError(f"lr_scales entry {item!r}: use name=factor, e.g. "
                       "'sigma=0.01'.")
    try:
      value = float(factor)
    except ValueError:
      value = math.nan
    if not math.isfinite(value) or value < 0:
      raise ValueError(f'lr_scales entry {item!r}: the factor must be a '
                       f'finite number >= 0, got {factor.strip()!r}.')
    if name in (n for n, _, _ in out):
      raise ValueError(f'lr_scales entry {item!r}: {name!r} is given twice.')
    out.append((name, value, item))
  return out


def _components(path) -> tuple[str, ...]:
  names = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
  return tuple(names)


def path_mask(params: PyTree, name: str) -> PyTree:
  """``True`` at the leaves whose path has a component equal to ``name``.

  Examples:
    >>> import numpy as np
    >>> path_mask({'fc': {'sigma': np.ones(1), 'mu': np.ones(1)},
    ...            'sigma_bn': {'scale': np.ones(1)}}, 'sigma')
    {'fc': {'mu': False, 'sigma': True}, 'sigma_bn': {'scale': False}}
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: name in _components(path), params)


def scale_updates(params: PyTree, spec: str) -> optax.GradientTransformation:
  """The transform that scales the updates of ``spec``'s parameters.

  Args:
    params: the parameters (arrays or ``jax.ShapeDtypeStruct`` leaves; only
      the tree's paths are read).
    spec: ``'name=factor,...'`` (:func:`parse_lr_scales`).

  Returns:
    An ``optax.GradientTransformation``: ``optax.masked(optax.scale(f),
    mask)`` per entry, chained (``optax.identity()`` for an empty spec).
    Chain it after the optimizer.

  Raises:
    ValueError: a bad entry (see :func:`parse_lr_scales`), or a name that
      matches no parameter (the message names it and lists the path
      components there are).

  Examples:
    >>> import numpy as np
    >>> scale_updates({'fc': {'kernel': np.ones(1)}}, 'sigma=0.01')
    Traceback (most recent call last):
    ...
    ValueError: lr_scales entry 'sigma=0.01': no parameter has a path component 'sigma'; the components are ['fc', 'kernel'].
  """
  parts = []
  for name, factor, item in _parse(spec):
    mask = path_mask(params, name)
    if not any(jax.tree_util.tree_leaves(mask)):
      names = sorted({c for path, _ in
                      jax.tree_util.tree_flatten_with_path(params)[0]
                      for c in _components(path)})
      shown = names if len(names) <= 30 else names[:30] + ['...']
      raise ValueError(
          f'lr_scales entry {item!r}: no parameter has a path component '
          f'{name!r}; the components are {shown}.')
    parts.append(optax.masked(optax.scale(factor), mask))
  return optax.chain(*parts) if parts else optax.identity()


__all__ = ['parse_lr_scales', 'path_mask', 'scale_updates']
