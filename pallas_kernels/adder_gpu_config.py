"""Block sizes of the GPU (Pallas Triton) adder kernels.

Triton tiles must have power-of-two shapes, so every block extent that becomes
the shape of a loaded tile (``block_m``, ``block_t`` of the forward pass,
``block_k``, ``block_m`` of the input gradient) is a power of two. The
reduction axis of each kernel is walked inside the kernel, one row at a time,
in chunks of ``block_k`` (forward) or ``block_t`` (input gradient) rows that
are unrolled; that chunk length is free.

Defaults (see ``docs/roofline.md``):

* forward: a ``64 x 128`` (T x M) f32 accumulator over 4 warps is 64 registers
  per thread, small enough for two resident programs per SM, and each ``k``
  step reads ``64 + 128`` operands for ``8192`` l1 terms.
* input gradient: a ``32 x 128`` (K x M) accumulator plus the ``32 x 128``
  patch tile it is compared against, the same 64 registers per thread.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels import _util


def _check_pow2(owner: str, name: str, value: int) -> None:
  if not isinstance(value, int) or not _util.is_power_of_2(value):
    raise ValueError(f'{owner}.{name} must be a positive power of two '
                     f'(Triton tiles), got {value!r}.')


def _check_positive(owner: str, name: str, value: int) -> None:
  if not isinstance(value, int) or value < 1:
    raise ValueError(f'{owner}.{name} must be a positive int, got {value!r}.')


def _check_launch(owner: str, num_warps: int, num_stages: int) -> None:
  if num_warps not in (1, 2, 4, 8, 16, 32):
    raise ValueError(f'{owner}.num_warps must be a power of two in [1, 32], '
                     f'got {num_warps!r}.')
  _check_positive(owner, 'num_stages', num_stages)


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
  """Tiling of ``Y[g, t, m] = -sum_k |P[g, k, m] - W[g, k, t]|`` on GPU.

  Attributes:
    block_m: output positions per program (power of two).
    block_t: output channels per program (power of two).
    block_k: taps per unrolled chunk of the in-kernel ``k`` loop; ``K`` is
      zero-padded to a multiple of it.
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining stages.

  Examples:
    >>> from pallas_kernels.adder_gpu_config import ForwardConfig
    >>> ForwardConfig.get_default(k=144, m=131072, t=16)
    ForwardConfig(block_m=128, block_t=16, block_k=8, num_warps=4, num_stages=2)
    >>> ForwardConfig(block_m=96)
    Traceback (most recent call last):
    ...
    ValueError: ForwardConfig.block_m must be a positive power of two (Triton tiles), got 96.
  """
  block_m: int = 128
  block_t: int = 64
  block_k: int = 8
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    owner = type(self).__name__
    _check_pow2(owner, 'block_m', self.block_m)
    _check_pow2(owner, 'block_t', self.block_t)
    _check_positive(owner, 'block_k', self.block_k)
    _check_launch(owner, self.num_warps, self.num_stages)

  @classmethod
  def get_default(cls, *, k: int, m: int, t: int) -> 'ForwardConfig':
    """Heuristic blocks for ``P[., k, m]``, ``W[., k, t]``.

    Small ``t`` or ``m`` shrink the tile to the next power of two so that
    little of it is padding; ``block_k`` never exceeds ``k``.
    """
    block_t = min(64, _util.next_power_of_2(t))
    block_m = min(128, max(16, _util.next_power_of_2(m)))
    block_k = min(8, k)
    warps = 4 if block_t * block_m >= 2048 else 2
    return cls(block_m=block_m, block_t=block_t, block_k=block_k,
               num_warps=warps)


@dataclasses.dataclass(frozen=True)
class InputGradConfig:
  """Tiling of ``dP[g, k, m] = sum_t gy[g, t, m] h(W[g, k, t] - P[g, k, m])``.

  Attributes:
    block_k: patch rows per program (power of two).
    block_m: output positions per program (power of two).
    block_t: output channels per unrolled chunk of the in-kernel ``t`` loop;
      ``T`` is zero-padded to a multiple of it (a zero cotangent adds 0).
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining stages.

  Examples:
    >>> from pallas_kernels.adder_gpu_config import InputGradConfig
    >>> InputGradConfig.get_default(k=144, m=131072, t=16)
    InputGradConfig(block_k=32, block_m=128, block_t=8, num_warps=4, num_stages=2)
  """
  block_k: int = 32
  block_m: int = 128
  block_t: int = 8
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    owner = type(self).__name__
    _check_pow2(owner, 'block_k', self.block_k)
    _check_pow2(owner, 'block_m', self.block_m)
    _check_positive(owner, 'block_t', self.block_t)
    _check_launch(owner, self.num_warps, self.num_stages)

  @classmethod
  def get_default(cls, *, k: int, m: int, t: int) -> 'InputGradConfig':
    """Heuristic blocks for ``P[., k, m]``, ``W[., k, t]``, ``gy[., t, m]``."""
    block_k = min(32, max(16, _util.next_power_of_2(k)))
    block_m = min(128, max(16, _util.next_power_of_2(m)))
    block_t = min(8, t)
    warps = 4 if block_k * block_m >= 2048 else 2
    return cls(block_k=block_k, block_m=block_m, block_t=block_t,
               num_warps=warps)
