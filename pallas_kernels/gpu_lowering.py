"""Lowering the Triton (GPU) kernels for a GPU from any host.

Pallas' Triton lowering sizes a kernel for the target GPU's compute
capability. On a host with a GPU that is the local device. On a host without
one (a ``jax.export`` for ``'cuda'`` from a CPU machine) jax 0.10 took
compute capability 9.0; since jax 0.11 the lowering refuses ("No supported
GPU devices found, please specify an abstract GPU device using
AbstractDevice") unless the abstract mesh names an abstract GPU device.
:func:`gpu_lowering` sets that up (an H100, compute capability 9.0, as jax
0.10 assumed) where it is missing, so the same export works on both.

It also keeps jax's notice that the Pallas Triton backend is deprecated
(jax >= 0.12, once per lowered kernel) inside the library: the notice is
addressed to this package, which keeps its Triton kernels while jax ships
them. Only that message is ignored, and only inside the context (the warning
filters are process-wide state, restored on exit, as with any
``warnings.catch_warnings``).

:func:`adderjax.ops.platform_dispatch.platform_dispatch` lowers its ``cuda``
and ``rocm`` branches inside this context, so the public ops export for GPU
from any host; call it yourself around a ``jax.export`` of the kernels of
:mod:`pallas_kernels.adder_gpu` / ``conv_gpu`` used directly.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from jax import export
  >>> from pallas_kernels import adder_gpu, gpu_lowering
  >>> p = jax.ShapeDtypeStruct((1, 8, 16), jnp.float32)
  >>> w = jax.ShapeDtypeStruct((1, 8, 4), jnp.float32)
  >>> checks = [export.DisabledSafetyCheck.custom_call(
  ...     gpu_lowering.TRITON_CUSTOM_CALL)]
  >>> with gpu_lowering.gpu_lowering('cuda'):
  ...   exp = export.export(jax.jit(adder_gpu.l1_forward), platforms=['cuda'],
  ...                       disabled_checks=checks)(p, w)
  >>> exp.platforms
  ('cuda',)
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import jax

#: The GPU that a lowering for ``cuda`` targets when the host has none.
DEFAULT_CUDA_DEVICE_KIND = 'NVIDIA H100'

#: The custom call that holds a lowered Triton kernel (for
#: ``jax.export.DisabledSafetyCheck.custom_call``).
TRITON_CUSTOM_CALL = '__gpu$xla.gpu.triton'

#: The start of jax's deprecation notice for the Pallas Triton backend.
TRITON_DEPRECATION = 'The Pallas Triton backend is deprecated'

GPU_PLATFORMS = ('cuda', 'rocm')


def target_mesh(platform: str = 'cuda',
                mesh: jax.sharding.AbstractMesh | None = None,
                device_kind: str = DEFAULT_CUDA_DEVICE_KIND
                ) -> jax.sharding.AbstractMesh:
  """``mesh`` (default: the current abstract mesh) with a GPU to lower for.

  Unchanged when it already names an abstract GPU, when it names none and
  the default backend is a GPU (its device is the target), and for ``rocm``
  (no default architecture is assumed there). Otherwise (no device, or the
  CPU devices of a mesh built on this host) the same axes with an abstract
  GPU: the local one where the default backend is a GPU, else
  ``device_kind``.

  Args:
    platform: ``'cuda'`` or ``'rocm'``.
    mesh: the abstract mesh of the lowering; ``None`` for the current one.
    device_kind: the GPU assumed for ``cuda`` on a host without a GPU.

  Returns:
    An abstract mesh for ``jax.sharding.use_abstract_mesh``.

  Raises:
    ValueError: ``platform`` is not a GPU platform.

  Examples:
    >>> import jax
    >>> from pallas_kernels import gpu_lowering
    >>> gpu_lowering.target_mesh('cuda').abstract_device.device_kind
    'NVIDIA H100'
    >>> gpu_lowering.target_mesh('rocm').abstract_device is None
    True
    >>> mesh = jax.make_mesh((1,), ('data',))  # this host's CPU device
    >>> gpu_lowering.target_mesh('cuda', mesh.abstract_mesh).axis_names
    ('data',)
  """
  if platform not in GPU_PLATFORMS:
    raise ValueError(f'platform must be one of {GPU_PLATFORMS}, got '
                     f'{platform!r}')
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  current = mesh.abstract_device
  if platform != 'cuda' or (current is not None and current.platform == 'gpu'):
    return mesh
  if jax.default_backend() == 'gpu':
    if current is None:
      return mesh
    device_kind = jax.devices()[0].device_kind
  device = jax.sharding.AbstractDevice(device_kind=device_kind,
                                       num_cores=None, platform='gpu')
  return mesh.update(abstract_device=device)


@contextlib.contextmanager
def gpu_lowering(platform: str = 'cuda',
                 mesh: jax.sharding.AbstractMesh | None = None,
                 device_kind: str = DEFAULT_CUDA_DEVICE_KIND
                 ) -> Iterator[None]:
  """Context for lowering Triton kernels for ``platform`` from any host.

  Enters ``jax.sharding.use_abstract_mesh`` of :func:`target_mesh` and
  ignores jax's Triton deprecation notice (that message only) inside.

  Args:
    platform: ``'cuda'`` or ``'rocm'``.
    mesh: the abstract mesh of the lowering; ``None`` for the current one.
    device_kind: the GPU assumed for ``cuda`` on a host without a GPU.

  Yields:
    Nothing; lower (``jax.export``, ``.lower()``) inside the block.

  Raises:
    ValueError: ``platform`` is not a GPU platform.

  Examples:
    >>> import jax
    >>> from pallas_kernels import gpu_lowering
    >>> with gpu_lowering.gpu_lowering('cuda'):
    ...   kind = jax.sharding.get_abstract_mesh().abstract_device.device_kind
    >>> kind
    'NVIDIA H100'
  """
  target = target_mesh(platform, mesh, device_kind)
  with warnings.catch_warnings():
    warnings.filterwarnings('ignore', message=TRITON_DEPRECATION,
                            category=DeprecationWarning)
    with jax.sharding.use_abstract_mesh(target):
      yield
