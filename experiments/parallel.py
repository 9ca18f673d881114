"""Data parallelism for the train loop: ``jax.jit`` over a mesh, or ``pmap``.

One train-step function serves both (see :mod:`experiments.train`); a
*runner* owns what differs: how the state and batches are placed on devices,
which rows of a global batch this process supplies, and how the step is
compiled.

* :class:`JitRunner` (default, ``config.parallelism='jit'``): a 1-D mesh of all
  devices with axis ``'data'``; the state is replicated
  (``NamedSharding(mesh, P())``), batches are split along ``'data'``. XLA
  inserts the gradient all-reduce, and BatchNorm statistics are those of the
  whole global batch because the batch is one global array.
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
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (isinstance(module, nn.BatchNorm) and context.method_name == '__call__'
        and module.axis_name is None):
      synced = module.clone(parent=module.scope, axis_name=axis_name)
      return synced(*args, **kwargs)
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(interceptor):
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


class JitRunner:
  """``jax.jit`` with a replicated state and a batch sharded over ``'data'``."""

  kind = 'jit'
  axis_name = None

  def __init__(self, devices=None):
    devices = list(devices if devices is not None else jax.devices())
    self.mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
    self.num_devices = len(devices)
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(AXIS))

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

  def compile_train(self, step_fn: Callable) -> Callable:
    return jax.jit(step_fn, in_shardings=(self.replicated,
                                          self.batch_sharding),
                   out_shardings=(self.replicated, self.replicated),
                   donate_argnums=0)

  def compile_eval(self, eval_fn: Callable) -> Callable:
    return jax.jit(eval_fn, in_shardings=(self.replicated,
                                          self.batch_sharding),
                   out_shardings=self.replicated)

  def get_metrics(self, metrics: Any) -> Any:
    return host_copy(metrics)


class PmapRunner:
  """``jax.pmap`` over local devices; collectives span all processes."""

  kind = 'pmap'
  axis_name = AXIS

  def __init__(self):
    self.local_devices = jax.local_devices()
    self.num_local = len(self.local_devices)
    self.num_devices = jax.device_count()

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
                    donate_argnums=0)

  def compile_eval(self, eval_fn: Callable) -> Callable:
    return jax.pmap(_with_sync_bn(eval_fn), axis_name=AXIS)

  def get_metrics(self, metrics: Any) -> Any:
    return host_copy(metrics, replicated_axis=True)


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


def make_runner(parallelism: str):
  """``'jit'`` -> :class:`JitRunner`, ``'pmap'`` -> :class:`PmapRunner`."""
  if parallelism == 'jit':
    return JitRunner()
  if parallelism == 'pmap':
    return PmapRunner()
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


