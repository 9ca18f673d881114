"""Backend registry for the adder ops.

A backend implements the two l1-shaped reductions on the canonical patch
layout (see :mod:`adderjax.ops.geometry`); the weight gradient of the
full-precision modes is a matmul and stays on XLA for every backend.

``implementation=None`` picks the first registered backend that supports the
default platform; ``'xla'`` is registered last and supports every platform.
Naming a backend that is unknown or cannot run raises ``ValueError``.
"""

from __future__ import annotations

import jax

from adderjax.ops import reference


class Backend:
  """Base class: the pure-XLA implementation (works on every platform)."""

  name = 'xla'
  #: Only used when named: ``implementation=None`` skips it (e.g. Pallas
  #: interpret mode, which runs anywhere but slowly).
  explicit_only = False

  def supported_on(self, platform: str) -> bool:  # pylint: disable=unused-argument
    """Whether this backend can run on ``platform`` ('cpu', 'gpu', 'tpu')."""
    return True

  def unsupported_reason(self, platform: str) -> str:
    return f'{self.name} does not run on {platform}'

  def forward(self, p, w, *, precision=None):  # pylint: disable=unused-argument
    """``-sum_k |P - W|``: ``[G,K,M] x [G,K,T] -> [G,T,M]`` float32."""
    return reference.l1_forward(p, w)

  def input_grad(self, p, w, gy, mode, *, precision=None):
    """Patch gradient ``[G,K,M]`` float32 for grad ``mode``."""
    return reference.l1_input_grad(p, w, gy, mode, precision=precision)

  def weight_grad(self, p, w, gy, mode, *, precision=None):
    """Kernel gradient ``[G,K,T]`` float32 for grad ``mode``."""
    return reference.l1_weight_grad(p, w, gy, mode, precision=precision)


_REGISTRY: dict[str, Backend] = {}
_ORDER: list[str] = []


def register(backend: Backend, *, prefer: bool = True) -> None:
  """Adds a backend; ``prefer`` puts it before the others for ``None``."""
  _REGISTRY[backend.name] = backend
  if backend.name in _ORDER:
    _ORDER.remove(backend.name)
  if prefer:
    _ORDER.insert(0, backend.name)
  else:
    _ORDER.append(backend.name)


def available() -> tuple[str, ...]:
  """Names of the registered backends, in the order ``None`` tries them."""
  return tuple(n for n in _ORDER if n != 'xla') + ('xla',)


def resolve(implementation: str | None, platform: str | None = None) -> str:
  """Returns the backend name to use, or raises a clear error."""
  platform = platform or jax.default_backend()
  if implementation is None:
    for name in available():
      backend = _REGISTRY[name]
      if not backend.explicit_only and backend.supported_on(platform):
        return name
    return 'xla'
  if not isinstance(implementation, str) or implementation not in _REGISTRY:
    raise ValueError(f'implementation must be None or one of '
                     f'{available()}, got {implementation!r}.')
  backend = _REGISTRY[implementation]
  if not backend.supported_on(platform):
    raise ValueError(f'implementation={implementation!r} cannot run here: '
                     f'{backend.unsupported_reason(platform)}.')
  return implementation


def get(name: str) -> Backend:
  return _REGISTRY[name]


register(Backend(), prefer=False)


# Optional accelerator backends (they register themselves on import, after
# the XLA backend above, which stays last for None).
try:
  import pallas_kernels.backend  # pylint: disable=unused-import
except ImportError:  # Pallas or the pallas_kernels package not installed.
  pass
