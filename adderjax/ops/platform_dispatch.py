"""A platform switch whose branches are lowered for their own platform only.

``lax.platform_dependent`` picks a branch by the platform the computation is
lowered for, but in a multi-platform lowering (``jax.export`` with
``platforms=['cpu', 'tpu']``) it lowers every kept branch for *every*
platform: a Mosaic kernel in the TPU branch is then lowered for the CPU too,
and ``pallas_call`` refuses ("Only interpret mode is supported on CPU
backend"). :func:`platform_dispatch` binds one primitive whose lowering is
registered per platform (``mlir.register_lowering(..., platform=p)``); JAX's
per-platform lowering narrows the lowering context to ``p`` before calling
the rule, so each branch is lowered for its own platform only, and a single
export carries the XLA code for the CPU and the Pallas kernels for GPU and
TPU. With one lowering platform (``jit``, AOT compiles) only that platform's
branch is emitted, as with ``lax.platform_dependent``. The ``cuda`` and
``rocm`` branches are lowered inside
:func:`pallas_kernels.gpu_lowering.gpu_lowering`: an export for ``cuda`` from a
host without a GPU gets an abstract one to lower the Triton kernels for.

A platform may also name a ``partitioned`` branch: the one lowered instead
when the computation is partitioned by XLA over several devices with no
manual axes (plain ``jit`` over sharded inputs, outside ``shard_map``). The
Mosaic kernels need that: XLA cannot partition a TPU custom call, and the
sharding of the inputs is not known when tracing, only when lowering.

The default branch is traced when the primitive is bound (it gives the
output types); every other branch only when it is lowered, inside the mesh
context of the call, and checked against those types then. A network traced
on a CPU host so pays nothing for its accelerator kernels unless it is
compiled or exported for an accelerator. The primitive has a batching rule
(``vmap`` wraps every branch in ``vmap``) and is meant for the inside of a
``custom_vjp`` (it has no differentiation rules of its own). Called eagerly
it runs the branch of the default backend.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from adderjax.ops.platform_dispatch import platform_dispatch
  >>> f = lambda x: platform_dispatch(x, cpu=lambda a: a + 1.0,
  ...                                 default=lambda a: a - 1.0)
  >>> float(jax.jit(f)(jnp.float32(1.0)))  # lowered for the CPU here
  2.0
"""

from __future__ import annotations

import contextvars
import math
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from jax.interpreters import batching
from jax.interpreters import mlir

from pallas_kernels import gpu_lowering

#: Platforms (``lax.platform_dependent`` names) with a lowering rule of their
#: own; any other platform lowers the default branch.
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')

#: Warned when a ``partitioned`` branch replaces a platform's branch.
FALLBACK_WARNING = (
    'adderjax: a jit over several {platform} devices with no mesh context: '
    'the Pallas kernels cannot be partitioned there, so the adder layers run '
    'the XLA backend (correct for any sharding, but slower and with more '
    'memory). Trace the step under `with jax.set_mesh(mesh):` (as the '
    "experiments' runners do) to run the kernels per shard.")

_dispatch_p = jex_core.Primitive('adder_platform_dispatch')
_dispatch_p.multiple_results = True


def _branch_index(platform: str, platforms: tuple[tuple[str, ...], ...]
                  ) -> int:
  for i, names in enumerate(platforms):
    if platform in names:
      return i
  return len(platforms)  # the default branch comes last


def _bind(flat_fns, args, platforms, fallbacks):
  """Traces the default branch (for the output types) and binds.

  The other branches are traced only when lowered for their platform (most
  lowerings are for one platform: tracing every accelerator kernel of a
  network on a CPU host would cost more than its XLA code). The mesh
  context of the call is kept and re-entered then.
  """
  default = len(platforms)
  jaxpr = jax.jit(flat_fns[default]).trace(*args).jaxpr
  return _dispatch_p.bind(
      *args, fns=tuple(flat_fns), default_jaxpr=jaxpr, platforms=platforms,
      fallbacks=fallbacks, mesh=jax.sharding.get_abstract_mesh())


def platform_dispatch(*args: Any, default: Callable,
                      partitioned: dict[str, Callable] | None = None,
                      **per_platform: Callable) -> Any:
  """``per_platform[lowering platform](*args)``, else ``default(*args)``.

  Args:
    *args: arrays (or pytrees of arrays) passed to every branch.
    default: the branch of platforms not named.
    partitioned: by platform name, the branch to lower instead of that
      platform's when XLA partitions the computation over several devices
      automatically (see the module docstring).
    **per_platform: branches by platform name (``'cpu'``, ``'cuda'``,
      ``'rocm'``, ``'tpu'``); one callable may serve several platforms.

  Returns:
    The selected branch's output (the pytree every branch returns).

  Raises:
    ValueError: an unknown platform name.
    TypeError: a branch that returns other shapes or dtypes than the
      default (when it is lowered).
  """
  partitioned = dict(partitioned or {})
  unknown = sorted((set(per_platform) | set(partitioned)) - set(PLATFORMS))
  if unknown:
    raise ValueError(f'platform_dispatch: unknown platform(s) {unknown}; use '
                     f'{PLATFORMS} (default= for the rest).')
  fns: list[Callable] = []
  names: list[list[str]] = []
  for name, fn in per_platform.items():
    for i, known in enumerate(fns):
      if known is fn:
        names[i].append(name)
        break
    else:
      fns.append(fn)
      names.append([name])
  fns.append(default)
  fallbacks = []
  for name, fn in partitioned.items():
    fallbacks.append((name, len(fns)))
    fns.append(fn)
  flat_args, in_tree = jax.tree.flatten(args)
  out_trees = []

  def flat(fn):
    def run(*leaves):
      out = fn(*jax.tree.unflatten(in_tree, leaves))
      leaves_out, tree = jax.tree.flatten(out)
      out_trees.append(tree)
      return leaves_out
    return run

  outs = _bind([flat(fn) for fn in fns], flat_args,
               tuple(tuple(n) for n in names), tuple(fallbacks))
  return jax.tree.unflatten(out_trees[0], outs)


def _impl(*args, fns, default_jaxpr, platforms, fallbacks, mesh):
  del fallbacks, mesh  # Eager: one device.
  index = _branch_index(jax.default_backend(), platforms)
  if index == len(platforms):
    return jex_core.jaxpr_as_fun(default_jaxpr)(*args)
  _check_outputs(fns[index], [jax.typeof(a) for a in args], default_jaxpr,
                 jax.sharding.get_abstract_mesh())
  return fns[index](*args)


def _abstract_eval(*avals, fns, default_jaxpr, platforms, fallbacks, mesh):
  del avals, fns, platforms, fallbacks, mesh
  return default_jaxpr.out_avals


def auto_partitioned(ctx) -> bool:
  """Whether XLA partitions this lowering over devices with no manual axes.

  The condition under which JAX refuses to lower a TPU custom call ("Mosaic
  kernels cannot be automatically partitioned"): a multi-device ``jit``
  outside ``shard_map``, or a ``shard_map`` manual over only some axes.
  """
  context = ctx.module_context.axis_context
  if isinstance(context, mlir.ShardingContext):
    return context.num_devices != 1
  if isinstance(context, mlir.SPMDAxisContext):
    manual = context.manual_axes | set(context.mesh.manual_axes)
    return bool(context.manual_axes) and (
        manual != frozenset(context.mesh.axis_names))
  return False


_TARGET_KINDS = contextvars.ContextVar('adder_target_device_kinds',
                                       default=())


def target_device_kinds() -> tuple[str, ...]:
  """Device kinds of the backend a branch is being lowered for.

  Set while :func:`platform_dispatch` lowers a branch (e.g. ``('TPU v4',)``
  for an AOT compile for a v4 topology from a CPU host), so that a branch can
  size its kernels for the target; ``()`` elsewhere or when the lowering has
  no backend with devices.
  """
  return _TARGET_KINDS.get()


def _backend_kinds(ctx) -> tuple[str, ...]:
  backend = getattr(ctx.module_context, 'backend', None)
  if backend is None:
    return ()
  try:
    return tuple(sorted({d.device_kind for d in backend.devices()}))
  except Exception:  # pylint: disable=broad-except
    return ()  # A client without devices: nothing is known.


def _lowering_rule(platform: str):
  def rule(ctx, *args, fns, default_jaxpr, platforms, fallbacks, mesh):
    token = _TARGET_KINDS.set(_backend_kinds(ctx))
    try:
      return _lower_branch(platform, ctx, args, fns, default_jaxpr,
                           platforms, fallbacks, mesh)
    finally:
      _TARGET_KINDS.reset(token)
  return rule


def _lower_branch(platform, ctx, args, fns, default_jaxpr, platforms,
                  fallbacks, mesh):
  index = _branch_index(platform, platforms)
  fallback = dict(fallbacks).get(platform)
  if fallback is not None and auto_partitioned(ctx):
    index = fallback
    warnings.warn(FALLBACK_WARNING.format(platform=platform), stacklevel=3)
  if index == len(platforms):
    fn = jex_core.jaxpr_as_fun(default_jaxpr)
  else:
    fn = fns[index]
    _check_outputs(fn, ctx.avals_in, default_jaxpr, mesh)
  if platform in gpu_lowering.GPU_PLATFORMS:
    # From a host without a GPU, an abstract one to lower the kernels for;
    # jax's Triton deprecation notice stays here (see pallas_kernels).
    context = gpu_lowering.gpu_lowering(platform, mesh)
  else:
    context = jax.sharding.use_abstract_mesh(mesh)
  with context:
    return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)


def _check_outputs(fn, avals_in, default_jaxpr, mesh):
  with jax.sharding.use_abstract_mesh(mesh):
    out = jax.eval_shape(fn, *[jax.ShapeDtypeStruct(a.shape, a.dtype)
                               for a in avals_in])
  got = [(o.shape, o.dtype) for o in out]
  want = [(a.shape, a.dtype) for a in default_jaxpr.out_avals]
  if got != want:
    raise TypeError(f'platform_dispatch: a branch returns {got}, the default '
                    f'branch {want}.')


def _batching_rule(args, dims, *, fns, default_jaxpr, platforms, fallbacks,
                   mesh):
  del mesh  # The call re-reads the context.
  # An unbatched operand has dimension None.
  moved = [a if d is None else jnp.moveaxis(a, d, 0)
           for a, d in zip(args, dims)]
  axes = [None if d is None else 0 for d in dims]
  batched = list(fns)
  batched[len(platforms)] = jex_core.jaxpr_as_fun(default_jaxpr)
  batched = [jax.vmap(fn, in_axes=axes) for fn in batched]
  outs = _bind(batched, moved, platforms, fallbacks)
  return outs, [0] * len(outs)


_dispatch_p.def_impl(_impl)
_dispatch_p.def_abstract_eval(_abstract_eval)
for _platform in PLATFORMS:
  mlir.register_lowering(_dispatch_p, _lowering_rule(_platform),
                         platform=_platform)
mlir.register_lowering(_dispatch_p, _lowering_rule('default'))
batching.primitive_batchers[_dispatch_p] = _batching_rule


# -- Sharding of the kernels' batch (shared by the Pallas backend and the
# adder attention).


def named_spec(sharding, ndim: int) -> tuple:
  """A NamedSharding's spec padded with ``None`` to ``ndim`` entries."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    raise NotImplementedError(
        f'the Pallas adder kernels are partitioned from NamedShardings (jit '
        f'over a jax.sharding.Mesh); got {sharding!r}.')
  spec = tuple(sharding.spec)
  return spec + (None,) * (ndim - len(spec))


def shard_map_axes(mesh, a, axis: int) -> tuple[str, ...] | None:
  """Mesh axes to split ``a``'s ``axis`` over with shard_map, or None.

  None when there is no mesh context; ``()`` when ``a`` is already local
  (every mesh axis manual) or not split.
  """
  if mesh.empty:
    return None
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  free = [n for n in mesh.axis_names if types[n] != jax.sharding.AxisType.Manual]
  if not free:  # Already inside a shard_map over every axis: per shard.
    return ()
  if all(types[n] == jax.sharding.AxisType.Explicit for n in free):
    spec = named_spec(jax.typeof(a).sharding, a.ndim)[axis]
    if spec is None:
      return ()
    return (spec,) if isinstance(spec, str) else tuple(spec)
  size = a.shape[axis]
  while free and size % math.prod(mesh.shape[n] for n in free):
    free.pop()
  return tuple(free)


def per_batch_shard(fn: Callable, n_sharded: int) -> Callable:
  """Runs ``fn`` per batch shard: shard_map under a mesh, else directly.

  The first ``n_sharded`` arguments are batch-major arrays split along
  their first axis over :func:`shard_map_axes`; the rest (kernels) are
  replicated, and ``shard_map``'s transpose sums their gradients over the
  shards. Without a mesh, or with an unsplit batch, ``fn`` is called
  directly: right on one device and inside ``shard_map`` / ``pmap``.
  """

  def run(*args):
    mesh = jax.sharding.get_abstract_mesh()
    axes = shard_map_axes(mesh, args[0], 0)
    if not axes:
      return fn(*args)
    b_spec = jax.sharding.PartitionSpec(axes)
    specs = tuple(b_spec if i < n_sharded else jax.sharding.PartitionSpec()
                  for i in range(len(args)))
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=b_spec,
                         check_vma=False)(*args)

  return run
