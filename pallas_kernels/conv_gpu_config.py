"""Block sizes of the patch-free GPU (Pallas Triton) adder conv kernels.

Triton tiles are powers of two; every extent below that becomes the shape of
a loaded tile is one. Per-generation defaults (A100: 164 KiB shared memory
and 64 K registers per SM, 108 SMs; H100: 228 KiB, 64 K, 132 SMs) differ only
in the tile that the accumulator fills: 64 f32 registers per thread at 4
warps (A100), 128 at 8 warps (H100), leaving room for two resident programs
per SM.

* forward: accumulator ``(block_t, block_w)`` -- output channels by output
  columns of one output row; each reduction step loads one kernel column
  (``block_t`` values) and one input row segment (``block_w`` values).
* input gradient: accumulator ``(block_c, block_w)`` -- input channels by
  phase-grid columns, plus the input tile it is compared against.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels import _util


def _check_pow2(owner, name, value):
  if isinstance(value, bool) or not isinstance(value, int) or (
      not _util.is_power_of_2(value)):
    raise ValueError(f'{owner}.{name} must be a positive power of two '
                     f'(Triton tiles), got {value!r}.')


def _check_launch(owner, num_warps, num_stages):
  if num_warps not in (1, 2, 4, 8, 16, 32):
    raise ValueError(f'{owner}.num_warps must be a power of two in [1, 32], '
                     f'got {num_warps!r}.')
  if isinstance(num_stages, bool) or not isinstance(num_stages, int) or (
      num_stages < 1):
    raise ValueError(f'{owner}.num_stages must be a positive int, got '
                     f'{num_stages!r}.')


@dataclasses.dataclass(frozen=True)
class Generation:
  """Accumulator budget of one GPU generation.

  Attributes:
    name: ``'a100'`` or ``'h100'``.
    acc_elements: f32 accumulator elements per program.
    num_warps: warps per program.
  """
  name: str
  acc_elements: int
  num_warps: int


GENERATIONS = {
    'a100': Generation('a100', 64 * 128, 4),
    'h100': Generation('h100', 128 * 128, 8),
}
DEFAULT_GENERATION = 'a100'


def get_generation(name: str | None) -> Generation:
  """The :class:`Generation` called ``name`` (``None``: A100).

  Raises:
    ValueError: an unknown name.
  """
  name = DEFAULT_GENERATION if name is None else name
  if name not in GENERATIONS:
    raise ValueError(f'unknown GPU generation {name!r}; known: '
                     f'{sorted(GENERATIONS)}.')
  return GENERATIONS[name]


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
  """Tiling of the patch-free forward on GPU.

  Attributes:
    block_t: output channels per program (power of two).
    block_w: output columns per program (power of two).
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining stages.

  Examples:
    >>> from pallas_kernels.conv_gpu_config import ForwardConfig
    >>> ForwardConfig.get_default(t=16, ow=32)
    ForwardConfig(block_t=16, block_w=32, num_warps=2, num_stages=2)
    >>> ForwardConfig(block_w=24)
    Traceback (most recent call last):
    ...
    ValueError: ForwardConfig.block_w must be a positive power of two (Triton tiles), got 24.
  """
  block_t: int = 64
  block_w: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    owner = type(self).__name__
    _check_pow2(owner, 'block_t', self.block_t)
    _check_pow2(owner, 'block_w', self.block_w)
    _check_launch(owner, self.num_warps, self.num_stages)

  @classmethod
  def get_default(cls, *, t: int, ow: int,
                  generation: str | None = None) -> 'ForwardConfig':
    """Accumulator ``(block_t, block_w)`` up to the generation's budget."""
    gen = get_generation(generation)
    block_w = min(64, max(16, _util.next_power_of_2(ow)))
    block_t = min(gen.acc_elements // block_w, max(16,
                                                   _util.next_power_of_2(t)))
    warps = gen.num_warps if block_t * block_w >= 4096 else 2
    return cls(block_t=block_t, block_w=block_w, num_warps=warps)


@dataclasses.dataclass(frozen=True)
class InputGradConfig:
  """Tiling of the patch-free input gradient on GPU.

  Attributes:
    block_c: input channels per program (power of two).
    block_w: phase-grid columns per program (power of two).
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining stages.

  Examples:
    >>> from pallas_kernels.conv_gpu_config import InputGradConfig
    >>> InputGradConfig.get_default(c=16, w=32)
    InputGradConfig(block_c=16, block_w=32, num_warps=2, num_stages=2)
  """
  block_c: int = 32
  block_w: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    owner = type(self).__name__
    _check_pow2(owner, 'block_c', self.block_c)
    _check_pow2(owner, 'block_w', self.block_w)
    _check_launch(owner, self.num_warps, self.num_stages)

  @classmethod
  def get_default(cls, *, c: int, w: int,
                  generation: str | None = None) -> 'InputGradConfig':
    """Accumulator plus input tile at half the generation's budget each."""
    gen = get_generation(generation)
    block_w = min(64, max(16, _util.next_power_of_2(w)))
    block_c = min(gen.acc_elements // 2 // block_w,
                  max(16, _util.next_power_of_2(c)))
    warps = gen.num_warps if block_c * block_w >= 4096 else 2
    return cls(block_c=block_c, block_w=block_w, num_warps=warps)
