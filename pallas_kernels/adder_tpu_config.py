"""Block sizes of the TPU (Pallas Mosaic) adder kernels.

Mosaic blocks must have their last two dims divisible by ``(8, 128)`` or equal
to the whole (padded) array dim. The long ``M`` axis (output positions) is the
lane axis of every block, so ``block_m`` is a multiple of 128. The reduction
axis of each kernel is a grid axis (``'arbitrary'``, innermost) whose blocks
are walked in-kernel in 128-wide lane chunks:

* forward: ``K`` is the lane axis of the transposed kernel block
  ``W^T[bt, bk]``. ``block_k`` is a multiple of 128; ``K`` is padded to a
  multiple of 16 when it fits in one block (the block is then the whole axis)
  and to a multiple of ``block_k`` otherwise.
* input gradient: ``T`` is the lane axis of the kernel block ``W[bk, bt]``, with
  the same rule for ``block_t``. ``block_k`` (sublanes of the patch block) is
  a multiple of 16, the sublane tiling of 16-bit dtypes.

The defaults keep the f32 accumulator at 32 vector registers (of 64) for the
forward and 16 (+16 for the patch tile) for the input gradient; see
``docs/roofline.md``.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels import _util

LANES = 128
#: Sublane tile that fits every dtype (16-bit types pack 16 rows per vreg).
SUBLANES = 16
#: Accumulator elements that fill half the 64 x (8 x 128) f32 register file.
_ACC_ELEMENTS = 32 * 8 * 128


def _check_multiple(owner: str, name: str, value: int, multiple: int) -> None:
  if not isinstance(value, int) or value < 1 or value % multiple:
    raise ValueError(f'{owner}.{name} must be a positive multiple of '
                     f'{multiple} (Mosaic tiling), got {value!r}.')


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
  """Tiling of ``Y[g, t, m] = -sum_k |P[g, k, m] - W[g, k, t]|`` on TPU.

  Attributes:
    block_m: output positions per block (lanes), a multiple of 128.
    block_t: output channels per block (sublanes), a multiple of 8.
    block_k: taps per grid step of the reduction axis, a multiple of 128.

  Examples:
    >>> from pallas_kernels.adder_tpu_config import ForwardConfig
    >>> ForwardConfig.get_default(k=144, m=131072, t=16)
    ForwardConfig(block_m=2048, block_t=16, block_k=512)
    >>> ForwardConfig(block_t=12)
    Traceback (most recent call last):
    ...
    ValueError: ForwardConfig.block_t must be a positive multiple of 8 (Mosaic tiling), got 12.
  """
  block_m: int = 1024
  block_t: int = 32
  block_k: int = 512

  def __post_init__(self):
    owner = type(self).__name__
    _check_multiple(owner, 'block_m', self.block_m, LANES)
    _check_multiple(owner, 'block_t', self.block_t, 8)
    _check_multiple(owner, 'block_k', self.block_k, LANES)

  @classmethod
  def get_default(cls, *, k: int, m: int, t: int) -> 'ForwardConfig':
    """Heuristic blocks: a 32-vreg accumulator, as wide in ``M`` as fits."""
    del k  # One 512-wide reduction block amortises the per-step overhead.
    block_t = min(32, _util.round_up(t, 8))
    block_m = max(LANES, min(_ACC_ELEMENTS // block_t, 2048,
                             _util.round_up(m, LANES)))
    block_m = _util.round_up(block_m, LANES)
    return cls(block_m=block_m, block_t=block_t)

  def padded_k(self, k: int) -> int:
    """``K`` after padding: one whole-axis block or a multiple of blocks."""
    k16 = _util.round_up(k, SUBLANES)
    return k16 if k16 <= self.block_k else _util.round_up(k, self.block_k)


@dataclasses.dataclass(frozen=True)
class InputGradConfig:
  """Tiling of ``dP[g, k, m] = sum_t gy[g, t, m] h(W[g, k, t] - P[g, k, m])``.

  Attributes:
    block_k: patch rows per block (sublanes), a multiple of 16.
    block_m: output positions per block (lanes), a multiple of 128.
    block_t: output channels per grid step of the reduction axis, a multiple
      of 128 (a smaller ``T`` is one whole-axis block).

  Examples:
    >>> from pallas_kernels.adder_tpu_config import InputGradConfig
    >>> InputGradConfig.get_default(k=144, m=131072, t=16)
    InputGradConfig(block_k=32, block_m=512, block_t=128)
  """
  block_k: int = 32
  block_m: int = 512
  block_t: int = 128

  def __post_init__(self):
    owner = type(self).__name__
    _check_multiple(owner, 'block_k', self.block_k, SUBLANES)
    _check_multiple(owner, 'block_m', self.block_m, LANES)
    _check_multiple(owner, 'block_t', self.block_t, LANES)

  @classmethod
  def get_default(cls, *, k: int, m: int, t: int) -> 'InputGradConfig':
    """Heuristic blocks: 16-vreg accumulator and patch tile."""
    del t
    block_k = min(32, _util.round_up(k, SUBLANES))
    block_m = max(LANES, min((_ACC_ELEMENTS // 2) // block_k,
                             _util.round_up(m, LANES)))
    block_m = _util.round_up(block_m, LANES)
    return cls(block_k=block_k, block_m=block_m)

  def padded_t(self, t: int) -> int:
    """``T`` after padding: whole axis if it fits one block, else multiples."""
    return t if t <= self.block_t else _util.round_up(t, self.block_t)
