"""Model introspection: one walker over the layer calls of a Linen model.

Every tool that needs to know what a Linen model does, layer by layer, walks
it the same way: :func:`intercept_layers` registers one
:func:`flax.linen.intercept_methods` interceptor that

* selects the calls it cares about (a module class, or a predicate of the
  module, and the method names: ``__call__`` by default),
* skips the throw-away calls Flax makes on a validation scope when it sets up
  a lifted module (``nn.remat``, ``nn.scan``, ... run their ``setup`` once
  more, abstractly, on a ``TestScope``; those calls have no real path),
* optionally computes a selected call with a replacement function instead of
  the module's method (the *rewrite* users: sync BatchNorm, the quantized
  forward pass), and
* records each selected call, in the order the calls return (so a module
  comes after the layers it calls), as a :class:`LayerCall`: its scope path,
  the module, the method name, the abstract shapes and dtypes of its inputs
  and output, its own variables, and a convolution's geometry.

:func:`~adderjax.trace_layers` runs ``model.init`` abstractly
(:func:`jax.eval_shape`: nothing is computed or allocated) under the walker
and returns the records.
The *observe* users read the records (:func:`adderjax.optim.adder_mask`,
:func:`adderjax.count_ops`) or, to see the real arrays, pass a replacement
that calls the module itself (the calibration of :mod:`adderjax.quant`); the
*rewrite* users pass a replacement that computes the call another way
(:meth:`adderjax.quant.QuantizedModel.apply`, the experiments' sync
BatchNorm).

Modules inside ``setup``, nested modules and modules under ``nn.remat`` are
recorded with their real paths (the lifted module as its own class).

Examples:
  >>> import jax.numpy as jnp
  >>> import flax.linen as nn
  >>> from adderjax import introspect
  >>> class Net(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     x = nn.Conv(4, (3, 3), strides=2, name='stem')(x)
  ...     return nn.Dense(2, name='head')(x.mean((1, 2)))
  >>> calls = introspect.trace_layers(Net(), jnp.ones((1, 8, 8, 3)))
  >>> [(c.name, c.type.__name__, c.input_shape, c.output_shape)
  ...  for c in calls]  # doctest: +NORMALIZE_WHITESPACE
  [('stem', 'Conv', (1, 8, 8, 3), (1, 4, 4, 4)),
   ('head', 'Dense', (1, 4), (1, 2)),
   ('', 'Net', (1, 8, 8, 3), (1, 2))]
  >>> calls[0].strides, calls[0].kernel_shape
  ((2, 2), (3, 3, 3, 4))
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
from flax.linen import module as _linen_module
import jax
import numpy as np

#: A replacement for a selected call; the signature of a Flax interceptor:
#: ``replace(next_fun, args, kwargs, context) -> output``, where
#: ``next_fun(*args, **kwargs)`` runs the module's method and
#: ``context.module`` / ``context.method_name`` name the call.
Replace = Callable[[Callable[..., Any], tuple, dict,
                    nn.module.InterceptorContext], Any]

# Flax runs lifted modules (nn.remat, nn.scan, ...) once more on a throw-away
# scope to validate them; calls made there have no real path.
_TEST_SCOPE = getattr(_linen_module, 'TestScope', None)


def _is_validation_scope(scope) -> bool:
  return _TEST_SCOPE is not None and isinstance(scope.root, _TEST_SCOPE)


def _abstract(tree: Any) -> Any:
  """Array-like leaves (arrays, tracers) as :class:`jax.ShapeDtypeStruct`."""
  def one(x):
    if hasattr(x, 'shape') and hasattr(x, 'dtype'):
      return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
    return x
  return jax.tree.map(one, tree)


def _own_variables(module: nn.Module) -> dict[str, dict[str, Any]]:
  """The module's own variables (not its submodules'), unboxed and abstract."""
  out = {}
  for collection, tree in module.variables.items():
    own = {}
    for name, value in tree.items():
      if isinstance(value, nn.meta.AxisMetadata):
        value = value.unbox()
      if isinstance(value, Mapping):  # a submodule's variables
        continue
      own[name] = _abstract(value)
    if own:
      out[collection] = own
  return out


def _int_tuple(value, n: int) -> tuple[int, ...]:
  """An int (or ``None``: 1) broadcast to ``n`` dims, or a sequence as ints."""
  if value is None:
    value = 1
  if isinstance(value, (int, np.integer)):
    return (int(value),) * n
  return tuple(int(v) for v in value)


def _padding(padding, n: int):
  """A padding string as given, else explicit ``(lo, hi)`` pairs."""
  if isinstance(padding, str):
    return padding
  if isinstance(padding, (int, np.integer)):
    return ((int(padding), int(padding)),) * n
  return tuple((int(p), int(p)) if isinstance(p, (int, np.integer)) else
               (int(p[0]), int(p[1])) for p in padding)


def _geometry(module: nn.Module) -> dict[str, Any]:
  """A convolution-like module's geometry fields (empty for other modules)."""
  kernel_size = getattr(module, 'kernel_size', None)
  if kernel_size is None or not hasattr(module, 'strides'):
    return {}
  if isinstance(kernel_size, (int, np.integer)):  # Flax: an int means 1-D
    kernel_size = (int(kernel_size),)
  kernel_size = tuple(int(k) for k in kernel_size)
  n = len(kernel_size)
  return dict(
      kernel_size=kernel_size,
      strides=_int_tuple(module.strides, n),
      padding=_padding(getattr(module, 'padding', 'VALID'), n),
      input_dilation=_int_tuple(getattr(module, 'input_dilation', 1), n),
      kernel_dilation=_int_tuple(getattr(module, 'kernel_dilation', 1), n),
      feature_group_count=int(getattr(module, 'feature_group_count', 1)))


def _shape_of(x) -> tuple[int, ...] | None:
  return tuple(x.shape) if isinstance(x, jax.ShapeDtypeStruct) else None


def _dtype_of(x) -> np.dtype | None:
  return x.dtype if isinstance(x, jax.ShapeDtypeStruct) else None


@dataclasses.dataclass(frozen=True)
class LayerCall:
  """One call of a module's method, as recorded by :func:`intercept_layers`.

  Arrays are recorded abstractly (:class:`jax.ShapeDtypeStruct`); other
  arguments as they were passed.

  Attributes:
    path: the module's scope path, e.g. ``('layer1_0', 'conv1')``; ``()``
      for the top module.
    module: the (bound) module that was called.
    method: the method name, e.g. ``'__call__'``.
    inputs: the positional arguments.
    kwargs: the keyword arguments.
    output: the value returned (by the replacement, for a replaced call).
    variables: the module's own variables after the call (its submodules'
      excluded), ``{collection: {name: ShapeDtypeStruct}}``, unboxed.
    kernel_size: spatial kernel shape of a convolution-like module (one with
      ``kernel_size`` and ``strides`` fields), else ``None``; so are the
      fields below.
    strides: one stride per spatial dimension.
    padding: the padding string as declared (``'SAME'``, ``'CIRCULAR'``,
      ...), or explicit ``(lo, hi)`` pairs.
    input_dilation: per spatial dimension.
    kernel_dilation: per spatial dimension.
    feature_group_count: the number of feature groups.
  """
  path: tuple[str, ...]
  module: nn.Module = dataclasses.field(compare=False, repr=False)
  method: str = '__call__'
  inputs: tuple = ()
  kwargs: dict = dataclasses.field(default_factory=dict)
  output: Any = None
  variables: dict = dataclasses.field(default_factory=dict)
  kernel_size: tuple[int, ...] | None = None
  strides: tuple[int, ...] | None = None
  padding: Any = None
  input_dilation: tuple[int, ...] | None = None
  kernel_dilation: tuple[int, ...] | None = None
  feature_group_count: int | None = None

  @property
  def name(self) -> str:
    """The path joined with ``'/'`` (``''`` for the top module)."""
    return '/'.join(self.path)

  @property
  def type(self) -> type:
    """The module's class."""
    return type(self.module)

  @property
  def input_shape(self) -> tuple[int, ...] | None:
    """Shape of the first positional argument, if it is an array."""
    return _shape_of(self.inputs[0]) if self.inputs else None

  @property
  def input_dtype(self) -> np.dtype | None:
    """Dtype of the first positional argument, if it is an array."""
    return _dtype_of(self.inputs[0]) if self.inputs else None

  @property
  def output_shape(self) -> tuple[int, ...] | None:
    """Shape of the output, if it is one array."""
    return _shape_of(self.output)

  @property
  def output_dtype(self) -> np.dtype | None:
    """Dtype of the output, if it is one array."""
    return _dtype_of(self.output)

  @property
  def kernel_shape(self) -> tuple[int, ...] | None:
    """Shape of the module's ``params`` ``kernel``, if it has one."""
    return _shape_of(self.variables.get('params', {}).get('kernel'))


def _as_predicate(select) -> Callable[[nn.Module], bool]:
  if select is None:
    return lambda module: True
  if isinstance(select, type) or (
      isinstance(select, tuple) and select and
      all(isinstance(t, type) for t in select)):
    return lambda module: isinstance(module, select)
  if callable(select):
    return select
  raise TypeError('select must be None, a module class, a tuple of module '
                  f'classes or a predicate of the module, got {select!r}.')


def _check_methods(methods) -> tuple[str, ...] | None:
  if methods is None:
    return None
  if isinstance(methods, str):
    return (methods,)
  if (isinstance(methods, Sequence) and
      all(isinstance(m, str) for m in methods)):
    return tuple(methods)
  raise TypeError('methods must be None (every method), a method name or a '
                  f'sequence of method names, got {methods!r}.')


@contextlib.contextmanager
def intercept_layers(select: Any = None, *,
                     replace: Replace | None = None,
                     methods: Sequence[str] | str | None = ('__call__',)
                     ) -> Iterator[list[LayerCall]]:
  """Records (and optionally replaces) the layer calls made inside the block.

  Inside the ``with`` block, every call of a method in ``methods`` on a bound
  module that ``select`` accepts is recorded, as it returns, as a
  :class:`LayerCall` appended to the yielded list. With ``replace``, such a
  call returns ``replace(next_fun, args, kwargs, context)`` instead (the
  signature of a :func:`flax.linen.intercept_methods` interceptor); the
  replacement may call ``next_fun(*args, **kwargs)``, the module's method,
  for instance to look at the real arrays. Calls on Flax's validation scopes
  (the throw-away ``setup`` of a lifted module) are neither recorded nor
  replaced. The block may run ``init``, ``apply``, or a traced function
  (``jax.jit``, ``jax.eval_shape``, ``jax.pmap``) that calls them; records
  are made when the model is traced.

  Args:
    select: which modules: ``None`` (all), a module class or a tuple of
      classes (``isinstance``, subclasses included), or a predicate
      ``select(module) -> bool``.
    replace: an optional replacement of the selected calls.
    methods: the method names to select (default ``('__call__',)``), or
      ``None`` for every intercepted method (``setup`` and user methods
      included).

  Yields:
    The list of :class:`LayerCall` records, filled as the calls return.

  Raises:
    TypeError: a ``select``, ``replace`` or ``methods`` of the wrong kind.

  Examples:
    Replace every Dense layer's output by its input plus one:

    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> model = nn.Sequential([nn.Dense(2), nn.relu])
    >>> x = jnp.array([[-3., 4.]])
    >>> variables = model.init(jax.random.key(0), x)
    >>> def plus_one(next_fun, args, kwargs, context):
    ...   return args[0] + 1
    >>> with intercept_layers(nn.Dense, replace=plus_one) as calls:
    ...   y = model.apply(variables, x)
    >>> y.tolist(), [c.name for c in calls]
    ([[0.0, 5.0]], ['layers_0'])
  """
  where = _as_predicate(select)
  names = _check_methods(methods)
  if replace is not None and not callable(replace):
    raise TypeError(f'replace must be None or a callable, got {replace!r}.')
  calls: list[LayerCall] = []

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if ((names is not None and context.method_name not in names) or
        module.scope is None or _is_validation_scope(module.scope) or
        not where(module)):
      return next_fun(*args, **kwargs)
    if replace is None:
      out = next_fun(*args, **kwargs)
    else:
      out = replace(next_fun, args, kwargs, context)
    calls.append(LayerCall(
        path=tuple(module.path), module=module, method=context.method_name,
        inputs=_abstract(tuple(args)), kwargs=_abstract(dict(kwargs)),
        output=_abstract(out), variables=_own_variables(module),
        **_geometry(module)))
    return out

  with nn.intercept_methods(interceptor):
    yield calls


def abstract_init(model: nn.Module, *args: Any, init_rngs: Any = None,
                  **kwargs: Any) -> Any:
  """``model.init(init_rngs, *args, **kwargs)`` under :func:`jax.eval_shape`.

  Nothing is computed or allocated. Array-like arguments (arrays,
  :class:`jax.ShapeDtypeStruct`) become abstract inputs; everything else
  (flags such as ``train=False``) is passed as is.

  Args:
    model: an unbound Linen module.
    *args: positional inputs of the model.
    init_rngs: the ``rngs`` of ``model.init`` (default
      ``jax.random.key(0)``; a dict such as ``{'params': k, 'dropout': k}``
      if the model draws other streams at init).
    **kwargs: keyword inputs of the model.

  Returns:
    The variables, with :class:`jax.ShapeDtypeStruct` leaves.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> x = jax.ShapeDtypeStruct((2, 4), jnp.float32)
    >>> abstract_init(nn.Dense(3), x)['params']['kernel'].shape
    (4, 3)
  """
  if init_rngs is None:
    init_rngs = jax.random.key(0)
  leaves, treedef = jax.tree.flatten((init_rngs, args, kwargs))
  dynamic = [isinstance(x, (jax.Array, np.ndarray, np.generic,
                            jax.ShapeDtypeStruct)) for x in leaves]

  def init(*dyn_leaves):
    it = iter(dyn_leaves)
    rngs, a, kw = jax.tree.unflatten(
        treedef, [next(it) if d else x for x, d in zip(leaves, dynamic)])
    return model.init(rngs, *a, **kw)

  return jax.eval_shape(init, *[x for x, d in zip(leaves, dynamic) if d])


def trace_layers(model: nn.Module, *args: Any, init_rngs: Any = None,
                 select: Any = None,
                 methods: Sequence[str] | str | None = ('__call__',),
                 **kwargs: Any) -> list[LayerCall]:
  """The layer calls of ``model.init(init_rngs, *args, **kwargs)``.

  Runs :func:`~adderjax.introspect.abstract_init` (``jax.eval_shape``:
  nothing is computed or allocated) under
  :func:`~adderjax.introspect.intercept_layers`.

  Args:
    model: an unbound Linen module.
    *args: positional inputs (arrays or :class:`jax.ShapeDtypeStruct`).
    init_rngs: the ``rngs`` of ``model.init`` (default
      ``jax.random.key(0)``).
    select: which modules to record (see
      :func:`~adderjax.introspect.intercept_layers`).
    methods: which methods to record (see
      :func:`~adderjax.introspect.intercept_layers`).
    **kwargs: keyword inputs of the model (e.g. ``train=False``).

  Returns:
    A list of :class:`~adderjax.introspect.LayerCall`, in the order the
    calls return.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> x = jax.ShapeDtypeStruct((1, 6, 6, 1), jnp.float32)
    >>> calls = trace_layers(nn.Conv(2, (3, 3), padding='VALID'), x)
    >>> calls[0].output_shape, calls[0].padding
    ((1, 4, 4, 2), 'VALID')
  """
  with intercept_layers(select, methods=methods) as calls:
    abstract_init(model, *args, init_rngs=init_rngs, **kwargs)
  return calls
