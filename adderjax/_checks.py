"""Argument checks shared by the public boundaries of adderjax.

Every check names the argument, shows the bad value with its type and says
what is allowed, e.g. ``eta`` given as a string:
``"`eta` must be a finite number > 0, got '0.2' (str)."``
NumPy and JAX scalars (``np.int64(10)``, ``np.float32(0.5)``, 0-d arrays) are
accepted wherever a Python number is; ``bool`` is never taken for a number.

A value of the wrong kind raises :class:`ArgumentTypeError`, which is both a
``TypeError`` and a ``ValueError`` (code that caught either before keeps
working); a value of the right kind outside the allowed range raises
``ValueError``. Traced values (under ``jax.jit``) cannot be read and pass the
range checks unchanged.

Examples:
  >>> import numpy as np
  >>> positive_int('num_classes', np.int64(10))
  10
  >>> finite_number('eta', np.float32(0.5), low=0, low_open=True)
  0.5
  >>> finite_number('eta', '0.2', low=0, low_open=True)
  Traceback (most recent call last):
  ...
  adderjax._checks.ArgumentTypeError: `eta` must be a finite number > 0, got '0.2' (str).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import math
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    'ArgumentTypeError', 'bool_mask', 'choice', 'describe', 'finite_number',
    'integer', 'positive_int', 'shape', 'structure_prefix',
]

_MAX_REPR = 80


class ArgumentTypeError(TypeError, ValueError):
  """An argument of the wrong kind (a ``TypeError`` and a ``ValueError``)."""


def describe(value: Any) -> str:
  """``repr(value)`` (shortened) and its type: ``"'0.2' (str)"``.

  Examples:
    >>> describe('0.2')
    "'0.2' (str)"
    >>> import numpy as np
    >>> describe(np.zeros((2, 3)))
    'an array of shape (2, 3) and dtype float64 (ndarray)'
  """
  if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) > 0:
    text = (f'an array of shape {tuple(np.shape(value))} and dtype '
            f'{value.dtype}')
  else:
    text = repr(value)
    if len(text) > _MAX_REPR:
      text = text[:_MAX_REPR - 3] + '...'
  return f'{text} ({type(value).__name__})'


def _is_traced(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer)


def _fail(error: type[Exception], name: str, allowed: str, value: Any,
          hint: str = '') -> None:
  raise error(f'`{name}` must be {allowed}, got {describe(value)}'
              f'{"; " + hint if hint else ""}.')


def _bound_text(low, high, low_open, high_open) -> str:
  if low is not None and high is not None:
    return (f'in {"(" if low_open else "["}{low:g}, {high:g}'
            f'{")" if high_open else "]"}')
  if low is not None:
    return f'{">" if low_open else ">="} {low:g}'
  if high is not None:
    return f'{"<" if high_open else "<="} {high:g}'
  return ''


def integer(name: str, value: Any, *, low: int | None = None,
            allowed: str | None = None) -> int:
  """``value`` as a Python int: an int, a NumPy / JAX integer scalar.

  Args:
    name: the argument's name, for the message.
    value: the value to check; ``bool`` and floats (even ``3.0``) refused.
    low: the smallest allowed value, if any.
    allowed: the message's description of what is allowed.

  Returns:
    ``int(value)``.

  Raises:
    ArgumentTypeError: not an integer.
    ValueError: below ``low``.

  Examples:
    >>> integer('axis', np.int32(-1))
    -1
    >>> integer('n', 2.0)
    Traceback (most recent call last):
    ...
    adderjax._checks.ArgumentTypeError: `n` must be an int, got 2.0 (float).
  """
  if allowed is None:
    allowed = 'an int' + (f' >= {low}' if low is not None else '')
  if isinstance(value, (bool, np.bool_)):
    _fail(ArgumentTypeError, name, allowed, value)
  if isinstance(value, (np.ndarray, jax.Array)):
    if (np.ndim(value) != 0
        or not jnp.issubdtype(value.dtype, jnp.integer)):
      _fail(ArgumentTypeError, name, allowed, value)
    if _is_traced(value):
      _fail(ArgumentTypeError, name, allowed + ' (a concrete value, not '
            'traced)', value)
  try:
    result = operator.index(value)
  except TypeError:
    _fail(ArgumentTypeError, name, allowed, value)
  if low is not None and result < low:
    _fail(ValueError, name, allowed, value)
  return int(result)


def positive_int(name: str, value: Any) -> int:
  """``value`` as a Python int >= 1 (NumPy / JAX integer scalars accepted).

  Examples:
    >>> positive_int('features', 4)
    4
    >>> positive_int('features', 0)
    Traceback (most recent call last):
    ...
    ValueError: `features` must be a positive int, got 0 (int).
  """
  return integer(name, value, low=1, allowed='a positive int')


def finite_number(name: str, value: Any, *, low: float | None = None,
                  high: float | None = None, low_open: bool = False,
                  high_open: bool = False, finite: bool = True,
                  hint: str = '') -> Any:
  """Checks a real number (Python, NumPy or JAX scalar, 0-d array).

  Args:
    name: the argument's name, for the message.
    value: the value; ``bool``, strings, complex and arrays of more than one
      element are refused.
    low: lower bound, if any.
    high: upper bound, if any.
    low_open: ``low`` itself is refused.
    high_open: ``high`` itself is refused.
    finite: refuse ``nan`` and ``inf``.
    hint: appended to the message.

  Returns:
    ``float(value)`` for a concrete value; a traced value unchanged.

  Raises:
    ArgumentTypeError: not a real number.
    ValueError: non-finite or out of range.

  Examples:
    >>> finite_number('momentum', 0.9, low=0, high=1, high_open=True)
    0.9
    >>> finite_number('momentum', 1.0, low=0, high=1, high_open=True)
    Traceback (most recent call last):
    ...
    ValueError: `momentum` must be a finite number in [0, 1), got 1.0 (float).
  """
  bounds = _bound_text(low, high, low_open, high_open)
  allowed = ('a finite number' if finite else 'a number') + (
      f' {bounds}' if bounds else '')
  if isinstance(value, (bool, np.bool_, str, bytes, complex)):
    _fail(ArgumentTypeError, name, allowed, value, hint)
  if isinstance(value, (np.ndarray, jax.Array, np.generic)):
    dtype = np.dtype(value.dtype)
    if (np.ndim(value) != 0 or dtype == np.bool_
        or not (jnp.issubdtype(dtype, jnp.integer)
                or jnp.issubdtype(dtype, jnp.floating))):
      _fail(ArgumentTypeError, name, allowed, value, hint)
    if _is_traced(value):
      return value
  try:
    v = float(value)
  except (TypeError, ValueError):
    _fail(ArgumentTypeError, name, allowed, value, hint)
  ok = not (finite and not math.isfinite(v)) and not math.isnan(v)
  if ok and low is not None:
    ok = v > low if low_open else v >= low
  if ok and high is not None:
    ok = v < high if high_open else v <= high
  if not ok:
    _fail(ValueError, name, allowed, value, hint)
  return v


def choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
  """``value`` if it is one of ``choices``.

  Examples:
    >>> choice('kind', 'cnn', ('cnn', 'adder'))
    'cnn'
    >>> choice('kind', 'shift', ('cnn', 'adder'))
    Traceback (most recent call last):
    ...
    ValueError: `kind` must be one of 'cnn', 'adder', got 'shift' (str).
  """
  choices = tuple(choices)
  try:
    found = value in choices
  except TypeError:  # unhashable / incomparable
    found = False
  if not found:
    _fail(ValueError, name, 'one of ' + ', '.join(map(repr, choices)), value)
  return value


def shape(name: str, value: Any, *, allow_empty: bool = False,
          hint: str = '') -> tuple[int, ...]:
  """A shape: a sequence of positive ints (NumPy / JAX ints accepted).

  Examples:
    >>> shape('input_shape', [28, np.int64(28), 1])
    (28, 28, 1)
    >>> shape('input_shape', (28.9, 28, 1))
    Traceback (most recent call last):
    ...
    adderjax._checks.ArgumentTypeError: `input_shape` must be a non-empty tuple of positive ints, got (28.9, 28, 1) (tuple); item 0 is 28.9 (float).
  """
  allowed = ('a tuple of positive ints' if allow_empty
             else 'a non-empty tuple of positive ints')
  if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 1:
    value = tuple(value.tolist()) if isinstance(value, np.ndarray) else (
        tuple(np.asarray(value).tolist()))
  if isinstance(value, (str, bytes, Mapping)) or not isinstance(
      value, Sequence):
    _fail(ArgumentTypeError, name, allowed, value, hint)
  out = []
  for i, d in enumerate(value):
    if isinstance(d, (bool, np.bool_)):
      error = ArgumentTypeError
    else:
      try:
        d = operator.index(d)
        error = None if d >= 1 else ValueError
      except TypeError:
        error = ArgumentTypeError
    if error is not None:
      _fail(error, name, allowed, value,
            f'item {i} is {describe(value[i])}' + (f'; {hint}' if hint else ''))
    out.append(int(d))
  if not out and not allow_empty:
    _fail(ValueError, name, allowed, value, hint)
  return tuple(out)


def _is_bool_leaf(leaf: Any) -> bool:
  if isinstance(leaf, (bool, np.bool_)):
    return True
  if isinstance(leaf, (np.ndarray, jax.Array)):
    return np.dtype(leaf.dtype) == np.bool_
  return False


def bool_mask(name: str, mask: Any) -> None:
  """Every leaf of ``mask`` is a bool (Python, NumPy, or a bool array).

  Raises:
    ArgumentTypeError: naming the first leaf that is not a bool, by path.

  Examples:
    >>> bool_mask('mask', {'conv': {'kernel': True}, 'bn': False})
    >>> bool_mask('mask', {'conv': {'kernel': 'yes'}})
    Traceback (most recent call last):
    ...
    adderjax._checks.ArgumentTypeError: `mask` leaves must be bools (True / False), got 'yes' (str) at ['conv']['kernel'].
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(mask)[0]:
    if not _is_bool_leaf(leaf):
      raise ArgumentTypeError(
          f'`{name}` leaves must be bools (True / False), got '
          f'{describe(leaf)} at {_path_text(path)}.')


def _path_text(path) -> str:
  return jax.tree_util.keystr(tuple(path)) or '<root>'


def _keys_text(keys) -> str:
  return '[' + ', '.join(repr(k) for k in sorted(keys, key=str)) + ']'


def _first_mismatch(prefix: Any, tree: Any, path: tuple) -> str | None:
  """Where ``prefix`` stops being a tree prefix of ``tree``, or ``None``."""
  if _is_bool_leaf(prefix) or prefix is None:
    return None  # a leaf of the prefix covers a whole subtree
  if isinstance(prefix, Mapping):
    if not isinstance(tree, Mapping):
      return (f'at {_path_text(path)} the <MASK> has a dict and the '
              f'<TARGET> has {type(tree).__name__}')
    if set(prefix) != set(tree):
      extra = set(prefix) - set(tree)
      missing = set(tree) - set(prefix)
      parts = []
      if extra:
        parts.append(f'keys {_keys_text(extra)} not in the <TARGET>')
      if missing:
        parts.append(f'no entry for the <TARGET> keys {_keys_text(missing)}')
      return f'at {_path_text(path)} the <MASK> has ' + ' and '.join(parts)
    for key in sorted(prefix, key=str):
      where = _first_mismatch(prefix[key], tree[key],
                              path + (jax.tree_util.DictKey(key),))
      if where:
        return where
    return None
  if isinstance(prefix, (list, tuple)) and not hasattr(prefix, '_fields'):
    if (not isinstance(tree, (list, tuple)) or type(tree) is not type(prefix)
        or len(tree) != len(prefix)):
      return (f'at {_path_text(path)} the <MASK> has '
              f'{type(prefix).__name__} of length {len(prefix)} and the '
              f'<TARGET> has {describe(tree)}')
    for i, (p, t) in enumerate(zip(prefix, tree)):
      where = _first_mismatch(p, t, path + (jax.tree_util.SequenceKey(i),))
      if where:
        return where
    return None
  try:
    jax.tree_util.tree_structure(prefix).flatten_up_to(tree)
  except (TypeError, ValueError) as e:
    return f'at {_path_text(path)}: {str(e).splitlines()[0]}'
  return None


def structure_prefix(name: str, mask: Any, tree: Any,
                     target: str = 'parameters', hint: str = '') -> None:
  """``mask`` is a tree prefix of ``tree`` (as :func:`optax.masked` needs).

  Raises:
    ValueError: naming ``name`` and the first path where they differ.

  Examples:
    >>> structure_prefix('mask', {'a': True}, {'a': 1.0})
    >>> structure_prefix('mask', {'a': True}, {'b': 1.0})
    Traceback (most recent call last):
    ...
    ValueError: `mask` does not match the structure of the parameters: at <root> the mask has keys ['a'] not in the parameters and no entry for the parameters keys ['b'].
  """
  try:
    jax.tree_util.tree_structure(mask).flatten_up_to(tree)
    return  # a leaf of the mask may cover a whole subtree of ``tree``
  except (TypeError, ValueError) as e:
    where = _first_mismatch(mask, tree, ()) or (
        f'at <MASK>: {str(e).splitlines()[0]}')
  if where:
    raise ValueError(
        f'`{name}` does not match the structure of the {target}: '
        + where.replace('<MASK>', name).replace('<TARGET>', target)
        + (f'; {hint}' if hint else '') + '.')
