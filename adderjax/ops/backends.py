"""Backend registry of the adder ops, and the lowering-time default.

Backends implement :class:`adderjax.ops.protocol.Backend` (three reductions
on the convolution's own arrays); the XLA backend is the base class the
others specialise. Registered here:

* ``'xla'`` (:class:`adderjax.ops.xla_backend.XlaBackend`): patch-free XLA
  kernels, on every platform.
* ``'pallas'``, ``'pallas_gpu_interpret'``, ``'pallas_tpu_interpret'``
  (:mod:`adderjax.ops.pallas_backend`, subclasses of the XLA backend), when
  Pallas and the ``pallas_kernels`` package import.

``implementation=None`` is not resolved when tracing: the op runs
:data:`AUTO`, whose reductions switch on the platform
(:mod:`adderjax.ops.platform_dispatch`), so the platform the computation is *lowered* for picks the
kernels: XLA on ``cpu``, the Triton kernels on ``cuda`` / ``rocm``, the
Mosaic kernels on ``tpu``. An AOT compile for a TPU topology or a
``jax.export`` for ``cuda`` from a CPU host gets the accelerator kernels,
a computation placed on the CPU of a TPU host gets XLA, and one multi-platform
``jax.export`` carries each platform's kernels.

Naming a backend that is unknown or cannot run on the default backend raises
``ValueError``.

Symbolic shapes (``jax.export`` with ``jax.export.symbolic_shape``): the XLA
backend takes a symbolic batch (and a symbolic spatial size where
:func:`adderjax.ops.geometry.make_geometry` allows one). The Pallas kernels
need static sizes, so :data:`AUTO` (and ``'pallas'``) lower a layer with a
symbolic size with the XLA backend on every platform; a lowering for an
accelerator warns (:data:`SYMBOLIC_FALLBACK_WARNING`). A named backend that
takes no symbolic sizes (the interpret backends) is refused by
:func:`check_symbolic`.

Examples:
  >>> from adderjax.ops import backends
  >>> backends.available()[-1]
  'xla'
  >>> backends.default_for('cpu'), backends.default_for('tpu')
  ('xla', 'pallas')
"""

from __future__ import annotations

import functools
import warnings

import jax

from adderjax.ops import geometry
from adderjax.ops import platform_dispatch
from adderjax.ops import protocol
from adderjax.ops import xla_backend

Backend = protocol.Backend

_REGISTRY: dict[str, protocol.Backend] = {}
_ORDER: list[str] = []
#: Compiled backend of each accelerator platform (``lax.platform_dependent``
#: names), filled when the Pallas backends import.
_PLATFORM: dict[str, protocol.Backend] = {}


def register(backend: protocol.Backend, *, prefer: bool = True) -> None:
  """Adds a backend under ``backend.name``.

  Args:
    backend: a :class:`adderjax.ops.protocol.Backend` instance.
    prefer: list it first in :func:`available` (else last before ``'xla'``).
  """
  if not isinstance(backend, protocol.Backend) or not backend.name:
    raise TypeError(f'backend must be a named adderjax.ops.protocol.Backend, '
                    f'got {backend!r}.')
  _REGISTRY[backend.name] = backend
  if backend.name in _ORDER:
    _ORDER.remove(backend.name)
  if prefer:
    _ORDER.insert(0, backend.name)
  else:
    _ORDER.append(backend.name)


def available() -> tuple[str, ...]:
  """Names of the registered backends (``'xla'`` last)."""
  return tuple(n for n in _ORDER if n != 'xla') + ('xla',)


def default_for(platform: str) -> str:
  """The backend ``implementation=None`` lowers to on ``platform``.

  Args:
    platform: ``'cpu'``, ``'gpu'``, ``'cuda'``, ``'rocm'`` or ``'tpu'``.
  """
  platform = 'cuda' if platform == 'gpu' else platform
  return _PLATFORM[platform].name if platform in _PLATFORM else 'xla'


def resolve(implementation: str | None,
            platform: str | None = None) -> str | None:
  """Checks ``implementation``; ``None`` stays ``None`` (chosen at lowering).

  Args:
    implementation: ``None`` or a registered name.
    platform: the platform a named backend must run on (default: the
      default backend).

  Returns:
    ``None`` or the validated name.

  Raises:
    ValueError: unknown name, or a backend that cannot run on ``platform``.
  """
  if implementation is None:
    return None
  if not isinstance(implementation, str) or implementation not in _REGISTRY:
    raise ValueError(f'implementation must be None or one of '
                     f'{available()}, got {implementation!r}.')
  platform = platform or jax.default_backend()
  backend = _REGISTRY[implementation]
  if not backend.supported_on(platform):
    raise ValueError(f'implementation={implementation!r} cannot run here: '
                     f'{backend.unsupported_reason(platform)}.')
  return implementation


def check_symbolic(name: str | None, geo) -> None:
  """Refuses a symbolic geometry for a backend that cannot take one.

  Args:
    name: a registered backend name or ``None`` (:data:`AUTO`, which takes
      symbolic sizes).
    geo: the layer's :class:`~adderjax.ops.geometry.ConvGeometry`.

  Raises:
    ValueError: ``geo`` has a symbolic size and the backend takes none; the
      message names the dimension and what to do.
  """
  backend = get(name)
  if backend.symbolic_shapes or not geo.symbolic:
    return
  dims = ', '.join(repr(str(d)) for d in geo.in_shape
                   if geometry.is_symbolic(d))
  shape = '(' + ', '.join(str(d) for d in geo.in_shape) + ')'
  reason = backend.symbolic_reason or 'it takes static sizes only'
  raise ValueError(
      f'implementation={name!r} cannot take the symbolic dimension {dims} of '
      f'the input shape {shape}: {reason}.'
      f" Use implementation=None (which lowers the XLA backend for a layer "
      f"with symbolic sizes) or 'xla', or export with static sizes.")


#: Warned when a layer with a symbolic size is lowered for an accelerator.
SYMBOLIC_FALLBACK_WARNING = (
    'adderjax: adder layers with a symbolic batch or spatial size (here the '
    'input shape {shape}) are lowered for {platform} with the XLA backend, '
    'not the Pallas kernels, which need static sizes. Export with a static '
    'batch to get the kernels.')


@functools.lru_cache(maxsize=4096)
def _symbolic_branch(platform: str, xla_branch, shape: str):
  """``xla_branch``, warning when it is lowered for ``platform``."""

  def run(*arrays):
    warnings.warn(SYMBOLIC_FALLBACK_WARNING.format(shape=shape,
                                                   platform=platform),
                  stacklevel=2)
    return xla_branch(*arrays)

  return run


def get(name: str | None) -> protocol.Backend:
  """The backend registered as ``name``; ``None`` gives :data:`AUTO`."""
  if name is None:
    return AUTO
  return _REGISTRY[name]


@functools.lru_cache(maxsize=4096)
def _branch(method, static: tuple, precision):
  """``method(*arrays, *static)``: one function object per layer kind.

  ``method`` is a bound method (equal, and hashing equal, for the same
  backend and function). The same object for the same arguments lets
  ``jit``'s trace cache serve the repeated layers of a network (the branches
  are traced for every platform, so this halves the tracing of a ResNet on
  CPU).
  """
  return lambda *arrays: method(*arrays, *static, precision=precision)


class DispatchBackend(xla_backend.XlaBackend):
  """A backend whose reductions are chosen by the lowering platform.

  Every reduction is a :func:`adderjax.ops.platform_dispatch.platform_dispatch`
  whose branches are the compiled Pallas backend of each accelerator platform
  and, for the rest (the CPU), the base class's XLA computation. The XLA
  branch is traced when the layer is called, the others when (and if) the
  computation is lowered for their platform; each is lowered only for its own
  platform. Traced without a mesh context and lowered for several devices
  that XLA partitions automatically (a plain ``jit`` over sharded inputs),
  the XLA branch replaces the kernels, with a warning: XLA cannot partition
  a Pallas call (under ``jax.set_mesh`` the kernels run per batch shard).
  The weight gradient is every backend's XLA one (a convolution's weight
  gradient plus a rank-1 term, on the matrix units): inherited, no switch.

  Args:
    name: registry name.
    supported: platforms (``jax.default_backend()`` names) it may be named
      on, or ``None`` for all.
    reason: why it cannot run elsewhere (for the error).
  """

  def __init__(self, name: str, supported: tuple[str, ...] | None = None,
               reason: str = ''):
    super().__init__()
    self.name = name
    self.supported = supported
    self.reason = reason

  def supported_on(self, platform: str) -> bool:
    return self.supported is None or platform in self.supported

  def unsupported_reason(self, platform: str) -> str:
    return self.reason.format(platform=platform) or super().unsupported_reason(
        platform)

  def _dispatch(self, method: str, arrays, static, precision):
    xla = getattr(super(), method)  # the base class's XLA computation
    if not _PLATFORM:
      return xla(*arrays, *static, precision=precision)
    per_platform = {p: _branch(getattr(b, method), static, precision)
                    for p, b in _PLATFORM.items()}
    xla_branch = _branch(xla, static, precision)
    geo = static[0]
    if geo.symbolic:
      # The kernels need static sizes (pallas_backend.SYMBOLIC_REASON): the
      # XLA computation on every platform; the accelerators' branches warn
      # when (and only if) they are lowered.
      shape = '(' + ', '.join(str(d) for d in geo.in_shape) + ')'
      return platform_dispatch.platform_dispatch(
          *arrays, default=xla_branch,
          **{p: _symbolic_branch(p, xla_branch, shape) for p in _PLATFORM})
    # With a mesh context the TPU branch runs the kernels per shard
    # (shard_map); without one it calls them directly, which only a
    # single-device (or manual) lowering can take: XLA is the fallback.
    no_mesh = jax.sharding.get_abstract_mesh().empty
    return platform_dispatch.platform_dispatch(
        *arrays, default=xla_branch,
        partitioned=dict.fromkeys(_PLATFORM, xla_branch) if no_mesh else None,
        **per_platform)

  def forward(self, x, kernel, geo, *, precision=None):
    return self._dispatch('forward', (x, kernel), (geo,), precision)

  def input_grad(self, x, kernel, gy, geo, mode, *, precision=None):
    return self._dispatch('input_grad', (x, kernel, gy), (geo, mode),
                          precision)


#: What ``implementation=None`` runs.
AUTO = DispatchBackend('auto')

register(xla_backend.XlaBackend(), prefer=False)

# The Pallas backends (optional: adderjax works without Pallas or the
# pallas_kernels package).
try:
  from adderjax.ops import pallas_backend  # pylint: disable=g-import-not-at-top
except ImportError:
  pallas_backend = None
if pallas_backend is not None:
  _PLATFORM.update(pallas_backend.platform_backends())
  register(DispatchBackend('pallas', pallas_backend.ACCELERATOR_PLATFORMS,
                           pallas_backend.UNSUPPORTED_REASON), prefer=True)
  for _b in pallas_backend.interpret_backends():
    register(_b, prefer=False)
