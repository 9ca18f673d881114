"""The Pallas backends of ``adderjax.adder_conv`` / ``adder_dense``.

The adapter between the adder op and the kernels of the leaf package
:mod:`pallas_kernels` (Triton on GPU, :mod:`pallas_kernels.adder_gpu`;
Mosaic on TPU, :mod:`pallas_kernels.adder_tpu`). It provides:

* the compiled kernels (:func:`platform_backends`, one per accelerator
  platform), which :mod:`adderjax.ops.backends` switches between when the
  computation is lowered: ``implementation=None`` (XLA on the CPU) and
  ``'pallas'`` (which cannot be named when the default backend is the CPU;
  ``None`` reaches the kernels from a CPU host, AOT compiles included).
* ``'pallas_gpu_interpret'`` / ``'pallas_tpu_interpret'``: the same GPU- or
  TPU-flavoured kernels run by the Pallas interpreter, on any platform (CPU
  included). They exist for tests and debugging and are only used when named.

What runs where:

* Forward and the HardTanh / sign input gradient of 1-D and 2-D layers with
  more than one tap: the patch-free kernels (:mod:`pallas_kernels.conv_gpu`,
  :mod:`pallas_kernels.conv_tpu`), which read an input tile with its halo on
  chip instead of a patch matrix in HBM; 1x1 layers (whose patch matrix is
  the input) and 3-D layers: the patch-matrix kernels
  (:mod:`pallas_kernels.adder_gpu`, :mod:`pallas_kernels.adder_tpu`). Float32
  accumulation; float64 inputs run the XLA backend, which keeps float64.
* The ``'unclipped'`` input gradient and the weight gradient are matmul
  identities on operands centred on the kernel (a convolution's own input
  and weight gradients plus rank-1 terms), which run on tensor cores / the
  MXU and need no patch matrix; an l1 kernel cannot use the matrix units
  (``docs/roofline.md``). :class:`PallasBackend` subclasses the XLA backend
  (:class:`adderjax.ops.xla_backend.XlaBackend`, with no batch tiles) and
  inherits them.

Sharding: a ``pallas_call`` cannot be partitioned by XLA, so every kernel
call runs per shard of the batch (the patch-free kernels: axis 0 of the
input and cotangent; the patch kernels: ``M = N * prod(out_spatial)``, which
is batch-major). The kernel weights are replicated; no activation is
gathered.

* Under a mesh context (``jax.set_mesh(mesh)``, what the experiments' runners
  do): ``jax.shard_map`` over the batch. With ``Explicit`` mesh axes the
  batch is split over the axes it is sharded on; with ``Auto`` axes, whose
  shardings are not known at trace time, over the mesh axes (in order,
  dropping trailing ones until their size divides it). Inside ``shard_map``
  or ``pmap`` (manual axes) the kernels run on the local shard.
* No mesh context: the kernels are called directly, which is right for one
  device; when the lowering is partitioned over several devices,
  :class:`adderjax.ops.backends.DispatchBackend` lowers the XLA backend
  instead (correct for any sharding) and warns. (The 3-D patch kernels keep
  ``jax.experimental.custom_partitioning`` for the named interpret backends;
  libtpu cannot compile it, jax-ml/jax#38196.)

Each op is also wrapped in ``jax.custom_batching.custom_vmap`` (folding a
vmapped axis into ``G``), because ``custom_partitioning`` has no batching
rule.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from adderjax.ops import geometry
from adderjax.ops import platform_dispatch
from adderjax.ops import reference
from adderjax.ops import xla_backend
from pallas_kernels import adder_gpu
from pallas_kernels import adder_tpu
from pallas_kernels import conv_gpu
from pallas_kernels import conv_tpu
from pallas_kernels import conv_tpu_config

#: Why the Pallas kernels take no symbolic sizes (``jax.export`` shape
#: polymorphism): the lowering of a layer with a symbolic batch or spatial
#: size for an accelerator runs the XLA backend instead
#: (:class:`adderjax.ops.backends.DispatchBackend`), and naming an interpret
#: backend for it is an error that says this.
SYMBOLIC_REASON = (
    "the Pallas kernels need static sizes: Pallas' Triton lowering has no "
    'dynamic grid bounds, and the kernels choose their blocks, grids and the '
    'VMEM fit (TPU) from the batch and spatial sizes when they are traced')

#: ``jax.default_backend()`` names on which the compiled kernels run.
ACCELERATOR_PLATFORMS = ('gpu', 'tpu')

#: Why ``implementation='pallas'`` cannot be named on ``{platform}``.
UNSUPPORTED_REASON = (
    'the Pallas kernels need a GPU or TPU and the default backend is '
    "'{platform}'; use implementation='pallas_gpu_interpret' or "
    "'pallas_tpu_interpret' to run them in interpret mode (slow, for tests "
    "and debugging), 'xla', or None (which lowers to the Pallas kernels for "
    'GPU and TPU targets, AOT compiles from this host included)')


@dataclasses.dataclass(frozen=True)
class KernelSet:
  """Which kernels an op runs (hashable: it keys the op caches).

  Attributes:
    flavour: ``'gpu'`` (Triton) or ``'tpu'`` (Mosaic). The choice between
      them by target platform is made when lowering, one level up
      (:mod:`adderjax.ops.platform_dispatch`).
    interpret: run in the Pallas interpreter (any platform).
  """
  flavour: str
  interpret: bool = False

  def __post_init__(self):
    if self.flavour not in ('gpu', 'tpu'):
      raise ValueError(f"flavour must be 'gpu' or 'tpu', got "
                       f'{self.flavour!r}.')

  def forward(self, p, w):
    mod = adder_gpu if self.flavour == 'gpu' else adder_tpu
    return mod.l1_forward(p, w, interpret=self.interpret)

  def input_grad(self, p, w, gy, mode):
    mod = adder_gpu if self.flavour == 'gpu' else adder_tpu
    return mod.l1_input_grad(p, w, gy, mode=mode, interpret=self.interpret)

  def _conv_kwargs(self) -> dict:
    kwargs = {'interpret': self.interpret}
    if self.flavour == 'tpu':
      kwargs['generation'] = _target_tpu_generation()
    return kwargs

  def conv_forward(self, x, w, geo: geometry.ConvGeometry):
    """Patch-free forward on ``(N, *spatial, C)`` (1-D or 2-D).

    The kernels take the geometry as their spec: they read its strides,
    padding, dilation and groups
    (:meth:`pallas_kernels.conv_spec.ConvSpec.of`).
    """
    mod = conv_gpu if self.flavour == 'gpu' else conv_tpu
    return mod.l1_conv_forward(x, w, geo, **self._conv_kwargs())

  def conv_input_grad(self, x, w, gy, geo: geometry.ConvGeometry, mode: str):
    """Patch-free input gradient (HardTanh or sign) on the conv's arrays."""
    mod = conv_gpu if self.flavour == 'gpu' else conv_tpu
    return mod.l1_conv_input_grad(x, w, gy, geo, mode=mode,
                                  **self._conv_kwargs())


# --- sharding ---------------------------------------------------------------


_spec = platform_dispatch.named_spec


def _patch_shardings(mesh, p_sharding):
  """``(G, -, M)`` sharding kept from the patches, and ``(G, -, -)``."""
  g_axes, _, m_axes = _spec(p_sharding, 3)
  return (NamedSharding(mesh, PartitionSpec(g_axes, None, m_axes)),
          NamedSharding(mesh, PartitionSpec(g_axes, None, None)))


def _forward_partition(kernels, mesh, arg_shapes, result_shape):
  del result_shape
  gm, g_only = _patch_shardings(mesh, arg_shapes[0].sharding)
  return mesh, kernels.forward, gm, (gm, g_only)


def _forward_infer(kernels, mesh, arg_shapes, result_shape):
  del kernels, result_shape
  return _patch_shardings(mesh, arg_shapes[0].sharding)[0]


def _input_grad_partition(kernels, mode, mesh, arg_shapes, result_shape):
  del result_shape
  gm, g_only = _patch_shardings(mesh, arg_shapes[0].sharding)
  fn = functools.partial(kernels.input_grad, mode=mode)
  return mesh, fn, gm, (gm, g_only, gm)


def _input_grad_infer(kernels, mode, mesh, arg_shapes, result_shape):
  del kernels, mode, result_shape
  return _patch_shardings(mesh, arg_shapes[0].sharding)[0]


_shard_map_axes = platform_dispatch.shard_map_axes


def _shard_map_m_axes(mesh, p) -> tuple[str, ...] | None:
  """Mesh axes to split ``M`` (axis 2 of the patches) over, or None."""
  return _shard_map_axes(mesh, p, 2)


def _per_batch_shard(fn, n_sharded: int):
  """:func:`~adderjax.ops.platform_dispatch.per_batch_shard`: without a
  mesh the kernel is called directly; a lowering that XLA partitions gets
  the XLA backend instead (:class:`adderjax.ops.backends.DispatchBackend`).
  """
  return platform_dispatch.per_batch_shard(fn, n_sharded)


def _per_m_shard(fn, partitioned, n_sharded: int, kernels: KernelSet):
  """Runs ``fn`` per ``M`` shard: shard_map under a mesh, else ``partitioned``.

  The first ``n_sharded`` arguments are ``[G, ., M]`` arrays split along
  ``M``; the rest are replicated. The output is ``[G, ., M]``. Without a
  mesh, the compiled TPU kernels are called directly (libtpu cannot compile
  ``custom_partitioning``; see the module docstring).
  """

  def run(*args):
    mesh = jax.sharding.get_abstract_mesh()
    axes = _shard_map_m_axes(mesh, args[0])
    if axes is None:
      if kernels.flavour == 'tpu' and not kernels.interpret:
        return fn(*args)
      return partitioned(*args)
    if not axes:
      return fn(*args)
    m_spec = PartitionSpec(None, None, axes)
    specs = tuple(m_spec if i < n_sharded else PartitionSpec()
                  for i in range(len(args)))
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=m_spec,
                         check_vma=False)(*args)

  return run


# --- vmap: fold the batch axis into G ---------------------------------------


def _fold_into_groups(axis_size, batched, *args):
  """Moves a vmapped leading axis into ``G`` (broadcasting unbatched args)."""
  out = []
  for a, b in zip(args, batched):
    if not b:
      a = jnp.broadcast_to(a, (axis_size,) + a.shape)
    out.append(a.reshape((axis_size * a.shape[1],) + a.shape[2:]))
  return out


@functools.lru_cache(maxsize=None)
def forward_op(kernels: KernelSet):
  """``(P[G,K,M], W[G,K,T]) -> Y[G,T,M]`` f32, partitionable and vmappable."""

  @custom_partitioning
  def partitioned(p, w):
    return kernels.forward(p, w)

  partitioned.def_partition(
      partition=functools.partial(_forward_partition, kernels),
      infer_sharding_from_operands=functools.partial(_forward_infer, kernels),
      sharding_rule='g k m, g k t -> g t m',
      need_replication_factors=('k', 't'))

  per_shard = _per_m_shard(kernels.forward, partitioned, 1, kernels)

  @jax.custom_batching.custom_vmap
  def op(p, w):
    return per_shard(p, w)

  @op.def_vmap
  def _rule(axis_size, in_batched, p, w):
    pf, wf = _fold_into_groups(axis_size, in_batched, p, w)
    y = op(pf, wf)
    return y.reshape((axis_size, -1) + y.shape[1:]), True

  return op


@functools.lru_cache(maxsize=None)
def input_grad_op(kernels: KernelSet, mode: str):
  """``(P, W, gy[G,T,M]) -> dP[G,K,M]`` f32, partitionable and vmappable."""

  @custom_partitioning
  def partitioned(p, w, gy):
    return kernels.input_grad(p, w, gy, mode)

  partitioned.def_partition(
      partition=functools.partial(_input_grad_partition, kernels, mode),
      infer_sharding_from_operands=functools.partial(_input_grad_infer,
                                                     kernels, mode),
      sharding_rule='g k m, g k t, g t m -> g k m',
      need_replication_factors=('k', 't'))

  per_shard = _per_m_shard(
      lambda p, gy, w: kernels.input_grad(p, w, gy, mode),
      lambda p, gy, w: partitioned(p, w, gy), 2, kernels)

  @jax.custom_batching.custom_vmap
  def op(p, w, gy):
    return per_shard(p, gy, w)

  @op.def_vmap
  def _rule(axis_size, in_batched, p, w, gy):
    pf, wf, gf = _fold_into_groups(axis_size, in_batched, p, w, gy)
    dp = op(pf, wf, gf)
    return dp.reshape((axis_size, -1) + dp.shape[1:]), True

  return op


# --- the registered backends --------------------------------------------------

#: The XLA tuning of the Pallas backends, for what they leave to their base
#: class (the matmul reductions, float64): no batch tiles, which are a CPU
#: cache optimisation.
XLA_CONFIG = xla_backend.XlaConfig(tile_bytes=None)


def _patch_free(geo: geometry.ConvGeometry, kernels: KernelSet,
                itemsize: int) -> bool:
  """Whether a layer runs the patch-free kernels.

  Every 1-D and 2-D layer does, one-tap (1x1) layers included: in isolation
  the patch kernels' temporary memory is smaller for them (v5e: ResNet-50's
  1x1 stride-2 shortcut 25 vs 245 MiB), but the whole ResNet-50 train step
  (v5e 2x4, batch 32 per chip) holds 2762 MB with the 1x1 layers on the
  patch-free kernels against 5138 MB on the patch kernels, whose transposed
  patch copies are kept for the backward pass. 3-D layers have no
  patch-free kernel, and on TPU a layer whose smallest patch-free step does
  not fit the target generation's VMEM (wide, many-channel layers on v4's
  16 MiB) runs the patch kernels, which tile the patch matrix instead.
  """
  if len(geo.kernel_size) not in (1, 2):
    return False
  if kernels.flavour != 'tpu':
    return True
  sizes = lambda v: (1,) * (2 - len(v)) + tuple(v)
  (h, w), (kh, kw) = sizes(geo.in_shape[1:-1]), sizes(geo.kernel_size)
  (oh, ow), (sh, _) = sizes(geo.out_spatial), sizes(geo.strides)
  dh = sizes(geo.dilation)[0]
  padding = ((0, 0),) * (2 - len(geo.padding)) + tuple(geo.padding)
  g = geo.groups
  return conv_tpu_config.fits_vmem(
      n=geo.batch, h=h, w=w, c=geo.in_features // g,
      t=geo.out_features // g, kh=kh, kw=kw, oh=oh, ow=ow,
      itemsize=itemsize, sh=sh, dh=dh, padding=padding,
      generation=_target_tpu_generation())


def _target_tpu_generation() -> str | None:
  """The TPU generation being compiled for, to size the kernels' blocks (an
  AOT compile for a v4 topology gets v4's 16 MiB of VMEM, not v5e's 128);
  ``None`` (the default generation) when unknown."""
  return conv_tpu_config.generation_of(platform_dispatch.target_device_kinds())


class PallasBackend(xla_backend.XlaBackend):
  """Runs the l1 reductions with the Pallas kernels of :mod:`pallas_kernels`.

  A specialisation of the XLA backend: it overrides the forward pass and the
  HardTanh / sign input gradient with the kernels and leaves the rest to the
  base class (``super()``): the weight gradient and the ``'unclipped'``
  input gradient (matmul identities, on the matrix units) and float64
  inputs, with :data:`XLA_CONFIG`.

  Args:
    name: registry name.
    kernels: which kernels to run.
  """

  symbolic_shapes = False
  symbolic_reason = SYMBOLIC_REASON

  def __init__(self, name: str, kernels: KernelSet):
    super().__init__(XLA_CONFIG)
    self.name = name
    self.kernels = kernels
    # Interpret mode is for tests and debugging: only used when named.
    self.explicit_only = kernels.interpret

  def supported_on(self, platform: str) -> bool:
    return self.kernels.interpret or platform == self.kernels.flavour

  def unsupported_reason(self, platform: str) -> str:
    return UNSUPPORTED_REASON.format(platform=platform)

  def _xla_instead(self, *arrays) -> bool:
    # float64: the kernels accumulate in float32; XLA keeps the precision
    # asked for.
    return reference.acc_dtype(*arrays) == jnp.float64

  def forward(self, x, kernel, geo, *, precision=None):
    if self._xla_instead(x, kernel):
      return super().forward(x, kernel, geo, precision=precision)
    if _patch_free(geo, self.kernels, x.dtype.itemsize):
      run = _per_batch_shard(
          lambda a, k: self.kernels.conv_forward(a, k, geo), 1)
      return run(x, kernel)
    p = geometry.extract_patches(x, geo)
    w = geometry.kernel_to_canonical(kernel, geo)
    y = forward_op(self.kernels)(p, w)
    return geometry.output_from_canonical(y, geo)

  def input_grad(self, x, kernel, gy, geo, mode, *, precision=None):
    if mode == 'unclipped' or self._xla_instead(x, kernel, gy):
      # 'unclipped' is a matmul identity: leave it to the matrix units.
      return super().input_grad(x, kernel, gy, geo, mode, precision=precision)
    if _patch_free(geo, self.kernels, x.dtype.itemsize):
      run = _per_batch_shard(
          lambda a, g, k: self.kernels.conv_input_grad(a, k, g, geo, mode), 2)
      # The kernel's copies of x (padding, phase split) wait for the
      # cotangent instead of being made in the forward pass and held.
      return run(xla_backend.after_cotangent(x, gy), gy, kernel)
    p = geometry.extract_patches(x, geo)
    w = geometry.kernel_to_canonical(kernel, geo)
    gyc = geometry.output_to_canonical(gy, geo)
    dp = input_grad_op(self.kernels, mode)(p, w, gyc)
    return reference.col2im(dp, geo, x.shape)


def interpret_backends() -> tuple[PallasBackend, ...]:
  """The interpret-mode backends (any platform; only used when named)."""
  return (PallasBackend('pallas_gpu_interpret', KernelSet('gpu', True)),
          PallasBackend('pallas_tpu_interpret', KernelSet('tpu', True)))


def platform_backends() -> dict[str, PallasBackend]:
  """The compiled backend of each accelerator platform (``lax`` names)."""
  gpu = PallasBackend('pallas', KernelSet('gpu'))
  return {'cuda': gpu, 'rocm': gpu,
          'tpu': PallasBackend('pallas', KernelSet('tpu'))}
