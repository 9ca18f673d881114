"""Data parallelism for the train loop: ``jax.jit`` over a mesh, or ``pmap``.

One train-step function serves both (see :mod:`experiments.train`); a
*runner* owns what differs: how the state and batches are placed on devices,
which rows of a global batch this process supplies, and how the step is
compiled.

* :class:`JitRunner` (default, ``config.parallelism='jit'``): a mesh of all
  devices built from the config (``config.mesh_shape``, ``config.mesh_axes``;
  default 1-D, axis ``'data'``) with :func:`make_mesh`; the state is
  replicated (``NamedSharding(mesh, P())``), batches are split over every
  mesh axis. XLA inserts the gradient all-reduce, and BatchNorm statistics
  are those of the whole global batch because the batch is one global array.
  The steps are traced and compiled inside ``jax.set_mesh(mesh)``, which is
  what lets the Pallas adder kernels run per batch shard (``shard_map``); on
  TPU they cannot be partitioned any other way (see
  :mod:`adderjax.ops.pallas_backend`).
* :class:`PmapRunner` (``config.parallelism='pmap'``): ``jax.pmap`` over the
  local devices with axis ``'data'``; the step averages gradients and BN
  running statistics with ``lax.pmean``, and every ``nn.BatchNorm`` of the
  model is made cross-device (``axis_name='data'``, see
  :func:`sync_batchnorm`) so that the normalisation uses the global batch's
  statistics as in the jit path and on one device.

Multi-host: :func:`maybe_initialize_distributed` calls
``jax.distributed.initialize`` when asked to; every process then supplies its
own rows of each global batch and :meth:`JitRunner.put_batch` assembles the
global array with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from adderjax import introspect

AXIS = 'data'

# Environment variables that, when set, mean "this is one process of a
# multi-process job" and make :func:`maybe_initialize_distributed` call
# ``jax.distributed.initialize()`` (which reads them or the cluster's own).
_CLUSTER_ENV = ('JAX_COORDINATOR_ADDRESS', 'COORDINATOR_ADDRESS')


def maybe_initialize_distributed(mode: str = 'auto', *,
                                 coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None,
                                 cpu_collectives: str = 'gloo') -> bool:
  """Initialises multi-process JAX when the flags or environment ask for it.

  Args:
    mode: ``'auto'``: initialise when ``coordinator_address`` is given or the
      environment names a coordinator (``JAX_COORDINATOR_ADDRESS``) or a
      multi-task SLURM / Open MPI job; ``'on'``: always (TPU pods, where
      ``jax.distributed.initialize()`` detects everything); ``'off'``: never.
    coordinator_address: ``host:port`` of process 0.
    num_processes: total number of processes.
    process_id: this process's index.
    cpu_collectives: CPU collectives implementation for multi-process CPU
      runs (``'gloo'``).

  Returns:
    Whether ``jax.distributed.initialize`` was called.

  Raises:
    ValueError: on an unknown ``mode``.
  """
  if mode not in ('auto', 'on', 'off'):
    raise ValueError(f"distributed mode {mode!r}: use 'auto', 'on' or 'off'.")
  if mode == 'off':
    return False
  env = os.environ
  asked = (mode == 'on' or coordinator_address is not None
           or any(env.get(k) for k in _CLUSTER_ENV)
           or int(env.get('SLURM_NTASKS', '1')) > 1
           or int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1)
  if not asked:
    return False
  platforms = env.get('JAX_PLATFORMS', '') or str(
      jax.config.jax_platforms or '')
  if 'cpu' in platforms.split(',') or platforms == '':
    jax.config.update('jax_cpu_collectives_implementation', cpu_collectives)
  kwargs = {}
  if coordinator_address is not None:
    kwargs['coordinator_address'] = coordinator_address
  if num_processes is not None:
    kwargs['num_processes'] = num_processes
  if process_id is not None:
    kwargs['process_id'] = process_id
  jax.distributed.initialize(**kwargs)
  return True


@contextlib.contextmanager
def sync_batchnorm(axis_name: str):
  """Makes every ``nn.BatchNorm`` without an ``axis_name`` cross-device.

  Inside this context (and under ``pmap``/``shard_map`` with ``axis_name``),
  each BatchNorm call is replaced by a clone of itself with
  ``axis_name=axis_name`` bound to the same scope (same variables), so its
  batch mean and variance are averaged over the devices: the normalisation
  is that of the global batch. Works with any Linen model, no field needed.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> bn = nn.BatchNorm(use_running_average=False)
    >>> x = jnp.arange(8.).reshape(4, 2, 1)
    >>> v = bn.init(jax.random.key(0), x[0])
    >>> def f(x):
    ...   with sync_batchnorm('d'):
    ...     return bn.apply(v, x, mutable=['batch_stats'])[0]
    >>> y = jax.pmap(f, axis_name='d')(x[:1])  # one device: plain BN
    >>> y.shape
    (1, 2, 1)
  """
  def unsynced(module) -> bool:
    return isinstance(module, nn.BatchNorm) and module.axis_name is None

  def synced(next_fun, args, kwargs, context):
    module = context.module
    return module.clone(parent=module.scope, axis_name=axis_name)(*args,
                                                                  **kwargs)
  with introspect.intercept_layers(unsynced, replace=synced):
    yield


def host_copy(tree: Any, replicated_axis: bool = False) -> Any:
  """Numpy copy of one replica of every array (works multi-process).

  Args:
    tree: a pytree of (replicated) ``jax.Array``.
    replicated_axis: the arrays carry a leading per-device axis (pmap).
  """
  def one(x):
    if not isinstance(x, jax.Array):
      return np.asarray(x)
    shard = np.asarray(x.addressable_shards[0].data)
    if replicated_axis:
      return shard.reshape(x.shape[1:])
    return shard.reshape(x.shape)
  return jax.tree.map(one, tree)


def make_mesh(mesh_shape=(-1,), mesh_axes=(AXIS,), devices=None
              ) -> jax.sharding.Mesh:
  """A data-parallel mesh over ``devices`` (default: every device).

  ``jax.make_mesh`` orders the devices by the physical topology (TPU ICI
  rings, several hosts included); the axes are ``Auto`` (XLA propagates the
  shardings).

  Args:
    mesh_shape: one size per axis; one entry may be ``-1`` (the rest of the
      devices).
    mesh_axes: one distinct name per axis.
    devices: the devices (e.g. those of a ``jax.experimental.topologies``
      description for an AOT compile).

  Raises:
    ValueError: names and sizes that do not match, or sizes whose product is
      not the device count.

  Examples:
    >>> import jax
    >>> mesh = make_mesh((-1,), ('data',))
    >>> mesh.axis_names, mesh.size == jax.device_count()
    (('data',), True)
    >>> make_mesh((3,), ('data',))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: mesh_shape (3,) does not cover the ... devices ...
  """
  devices = list(devices if devices is not None else jax.devices())
  shape, axes = tuple(mesh_shape), tuple(mesh_axes)
  if (not axes or len(set(axes)) != len(axes)
      or not all(isinstance(a, str) and a for a in axes)):
    raise ValueError(f'mesh_axes must be distinct non-empty names, got '
                     f'{mesh_axes!r}.')
  if len(shape) != len(axes) or not all(
      isinstance(d, int) and (d > 0 or d == -1) for d in shape) or (
          shape.count(-1) > 1):
    raise ValueError(f'mesh_shape must hold one positive size (or one -1) '
                     f'per axis of mesh_axes {axes}, got {mesh_shape!r}.')
  known = int(np.prod([d for d in shape if d != -1]))
  n = len(devices)
  if -1 in shape:
    if n % known:
      raise ValueError(f'mesh_shape {mesh_shape!r} does not divide the {n} '
                       f'devices.')
    shape = tuple(n // known if d == -1 else d for d in shape)
  if int(np.prod(shape)) != n:
    raise ValueError(f'mesh_shape {mesh_shape!r} does not cover the {n} '
                     f'devices (its product must be {n}; -1 fills in).')
  return jax.make_mesh(shape, axes, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


class MeshJit:
  """A jitted function traced, called and compiled inside its mesh context.

  Behaves like the ``jax.jit`` object it wraps (call, ``trace``, ``lower``)
  with ``jax.set_mesh(mesh)`` entered around each, so everything traced in it
  sees the mesh (``jax.sharding.get_abstract_mesh()``).
  """

  def __init__(self, jitted: Callable, mesh: jax.sharding.Mesh):
    self.jitted = jitted
    self.mesh = mesh

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args)

  def trace(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted.trace(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted.trace(*args).lower()


class JitRunner:
  """``jax.jit`` with a replicated state and a batch sharded over the mesh.

  Args:
    devices: the devices (default: all).
    mesh_shape: mesh sizes (see :func:`make_mesh`).
    mesh_axes: mesh axis names; the batch is split over all of them.
  """

  kind = 'jit'
  axis_name = None

  def __init__(self, devices=None, mesh_shape=(-1,), mesh_axes=(AXIS,)):
    self.mesh = make_mesh(mesh_shape, mesh_axes, devices)
    self.num_devices = self.mesh.size
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh,
                                        P(tuple(self.mesh.axis_names)))

  @property
  def platform(self) -> str:
    """The platform of the mesh's devices (``'cpu'``, ``'gpu'``, ``'tpu'``)."""
    return self.mesh.devices.flat[0].platform

  def local_rows(self, global_size: int) -> slice:
    """The rows of a global batch that this process's devices hold."""
    check_divisible(global_size, self.num_devices)
    index_map = self.batch_sharding.addressable_devices_indices_map(
        (global_size,))
    starts = sorted(ix[0].start or 0 for ix in index_map.values())
    per = global_size // self.num_devices
    lo, hi = starts[0], starts[-1] + per
    if hi - lo != per * len(starts):
      raise ValueError('this process\'s devices do not hold a contiguous '
                       'block of the batch; reorder the mesh devices.')
    return slice(lo, hi)

  def put_state(self, host_state: Any) -> Any:
    def put(x):
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, self.replicated,
                                          lambda idx: x[idx])
    return jax.tree.map(put, host_state)

  def get_state(self, state: Any) -> Any:
    return host_copy(state)

  def put_batch(self, local_batch: dict[str, np.ndarray],
                global_size: int) -> dict[str, jax.Array]:
    out = {}
    for k, v in local_batch.items():
      v = np.asarray(v)
      out[k] = jax.make_array_from_process_local_data(
          self.batch_sharding, v, (global_size,) + v.shape[1:])
    return out

  def compile_train(self, step_fn: Callable) -> MeshJit:
    return MeshJit(jax.jit(step_fn, in_shardings=(self.replicated,
                                                  self.batch_sharding),
                           out_shardings=(self.replicated, self.replicated),
                           donate_argnums=0), self.mesh)

  def compile_eval(self, eval_fn: Callable) -> MeshJit:
    return MeshJit(jax.jit(eval_fn, in_shardings=(self.replicated,
                                                  self.batch_sharding),
                           out_shardings=self.replicated), self.mesh)

  def abstract_batch(self, shapes: dict[str, tuple[tuple[int, ...], Any]]
                     ) -> dict[str, jax.ShapeDtypeStruct]:
    """Global batch ``{name: (shape, dtype)}`` as sharded shape structs."""
    return {k: jax.ShapeDtypeStruct(shape, dtype,
                                     sharding=self.batch_sharding)
            for k, (shape, dtype) in shapes.items()}

  def abstract_state(self, host_state: Any) -> Any:
    """The state's shape structs as :meth:`put_state` would place them."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), _dtype(x),
                                       sharding=self.replicated), host_state)

  def get_metrics(self, metrics: Any) -> Any:
    return host_copy(metrics)


class PmapRunner:
  """``jax.pmap`` over local devices; collectives span all processes.

  Args:
    devices: the local devices (default: ``jax.local_devices()``).
  """

  kind = 'pmap'
  axis_name = AXIS

  def __init__(self, devices=None):
    self.local_devices = list(devices if devices is not None
                              else jax.local_devices())
    self.num_local = len(self.local_devices)
    self.num_devices = (jax.device_count() if devices is None
                        else self.num_local)

  @property
  def platform(self) -> str:
    """The platform of the local devices (``'cpu'``, ``'gpu'``, ``'tpu'``)."""
    return self.local_devices[0].platform

  def local_rows(self, global_size: int) -> slice:
    check_divisible(global_size, self.num_devices)
    per = global_size // jax.process_count()
    p = jax.process_index()
    return slice(p * per, (p + 1) * per)

  def put_state(self, host_state: Any) -> Any:
    sharding = NamedSharding(
        jax.sharding.Mesh(np.array(self.local_devices), (AXIS,)), P(AXIS))

    def put(x):
      x = np.asarray(x)
      stacked = np.broadcast_to(x[None], (self.num_local,) + x.shape)
      return jax.device_put(np.ascontiguousarray(stacked), sharding)
    return jax.tree.map(put, host_state)

  def get_state(self, state: Any) -> Any:
    return host_copy(state, replicated_axis=True)

  def put_batch(self, local_batch: dict[str, np.ndarray],
                global_size: int) -> dict[str, np.ndarray]:
    del global_size
    return {k: np.asarray(v).reshape((self.num_local, -1) + v.shape[1:])
            for k, v in local_batch.items()}

  def compile_train(self, step_fn: Callable) -> Callable:
    return jax.pmap(_with_sync_bn(step_fn), axis_name=AXIS,
                    devices=self._pmap_devices(), donate_argnums=0)

  def compile_eval(self, eval_fn: Callable) -> Callable:
    return jax.pmap(_with_sync_bn(eval_fn), axis_name=AXIS,
                    devices=self._pmap_devices())

  def _pmap_devices(self):
    # pmap's default is every local device; name them only when they were
    # given (a subset, or another backend's devices for an AOT compile).
    if self.local_devices == jax.local_devices():
      return None
    return self.local_devices

  def abstract_batch(self, shapes: dict[str, tuple[tuple[int, ...], Any]]
                     ) -> dict[str, jax.ShapeDtypeStruct]:
    """Global batch ``{name: (shape, dtype)}`` split per local device."""
    return {k: jax.ShapeDtypeStruct(
        (self.num_local, shape[0] // self.num_local) + tuple(shape[1:]), dtype)
            for k, (shape, dtype) in shapes.items()}

  def abstract_state(self, host_state: Any) -> Any:
    """The state's shape structs as :meth:`put_state` would place them."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((self.num_local,) + np.shape(x),
                                       _dtype(x)), host_state)

  def get_metrics(self, metrics: Any) -> Any:
    return host_copy(metrics, replicated_axis=True)


def _dtype(x):
  """The dtype of an array or a shape struct."""
  return x.dtype if hasattr(x, 'dtype') else np.asarray(x).dtype


def _with_sync_bn(fn):
  def wrapped(*args):
    with sync_batchnorm(AXIS):
      return fn(*args)
  return wrapped


def check_divisible(global_size: int, num_devices: int) -> None:
  """Raises a ValueError naming both numbers unless devices divide the batch.

  Examples:
    >>> check_divisible(256, 8)
    >>> check_divisible(100, 8)
    Traceback (most recent call last):
    ...
    ValueError: batch size 100 is not divisible by the 8 devices (use a multiple of 8).
  """
  if global_size % num_devices:
    raise ValueError(f'batch size {global_size} is not divisible by the '
                     f'{num_devices} devices (use a multiple of '
                     f'{num_devices}).')


def make_runner(parallelism: str, *, devices=None, mesh_shape=(-1,),
                mesh_axes=(AXIS,)):
  """``'jit'`` -> :class:`JitRunner`, ``'pmap'`` -> :class:`PmapRunner`.

  Args:
    parallelism: ``'jit'`` or ``'pmap'``.
    devices: the devices (default: all for jit, the local ones for pmap).
    mesh_shape: the jit runner's mesh sizes (:func:`make_mesh`).
    mesh_axes: the jit runner's mesh axis names.
  """
  if parallelism == 'jit':
    return JitRunner(devices, mesh_shape=mesh_shape, mesh_axes=mesh_axes)
  if parallelism == 'pmap':
    return PmapRunner(devices)
  raise ValueError(f"parallelism {parallelism!r}: use 'jit' or 'pmap'.")


def is_primary() -> bool:
  return jax.process_index() == 0


def axis_mean(x, axis_name):
  """``lax.pmean`` over ``axis_name``, identity when it is ``None``."""
  if axis_name is None:
    return x
  return jax.lax.pmean(x, axis_name)


def axis_sum(x, axis_name):
  """``lax.psum`` over ``axis_name``, identity when it is ``None``."""
  if axis_name is None:
    return x
  return jax.lax.psum(x, axis_name)


