"""Block sizes of the patch-free TPU (Mosaic) adder conv kernels.

Layout (see :mod:`pallas_kernels.conv_tpu`): the activation is stored
``(H, W, G, C, N)``, so a VMEM block of one image row is ``(W, C, N)``: the
batch is the lane axis, the channels the sublane axis and the spatial
positions untiled leading dims. Every constraint follows from Mosaic's
``(8, 128)`` tiling of the last two block dims:

* ``block_n`` (lanes of every activation block): a multiple of 128, or the
  whole batch when ``N <= 128`` (the block is then the whole axis).
* forward ``block_c`` is the lane axis of the kernel block ``W^T[taps, T, C]``:
  a multiple of 128, or the whole (16-padded) ``C``.
* forward ``block_t`` (sublanes of the output block): a multiple of 8.
* input-gradient ``block_c`` (sublanes of the activation blocks): a multiple of
  16 (the packed bf16 tile).
* input-gradient ``block_t`` is the lane axis of the kernel block
  ``W[taps, C, T]``: a multiple of 128, or the whole (8-padded) ``T``.

``vmem_limit_bytes`` is the scoped-VMEM limit handed to Mosaic; the defaults
size the blocks from an estimate of the double-buffered working set so it fits
the generation's VMEM (v4: 16 MiB per TensorCore; v5e, v6e: 128 MiB), choosing
among the configs that fit the one that reads the activation (forward) or the
cotangent (input gradient) from HBM the fewest times.
"""

from __future__ import annotations

import dataclasses
import math

from pallas_kernels import _util

LANES = 128
SUBLANES = 16
_MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Generation:
  """What the block heuristics need to know about one TPU generation.

  Attributes:
    name: ``'v4'``, ``'v5e'`` or ``'v6e'``.
    vmem_bytes: VMEM per TensorCore.
    vmem_budget_bytes: the working set the defaults aim for (half of VMEM or
      less, so that Mosaic's internal scratch and double buffers fit).
    block_t: output channels per step (sublanes of the forward accumulator).
  """
  name: str
  vmem_bytes: int
  vmem_budget_bytes: int
  block_t: int


GENERATIONS = {
    # v4: 32 MiB of VMEM per chip, 16 MiB per TensorCore; a megacore
    # program is compiled against the 16 MiB ("Used 18.44M of 16.00M vmem").
    'v4': Generation('v4', 16 * _MIB, 10 * _MIB, 32),
    'v5e': Generation('v5e', 128 * _MIB, 48 * _MIB, 32),
    'v6e': Generation('v6e', 128 * _MIB, 48 * _MIB, 64),
}
DEFAULT_GENERATION = 'v5e'


def get_generation(name: str | None) -> Generation:
  """The :class:`Generation` called ``name`` (``None``: v5e).

  Raises:
    ValueError: an unknown name.
  """
  name = DEFAULT_GENERATION if name is None else name
  if name not in GENERATIONS:
    raise ValueError(f'unknown TPU generation {name!r}; known: '
                     f'{sorted(GENERATIONS)}.')
  return GENERATIONS[name]


def generation_of(device_kinds) -> str | None:
  """The generation whose defaults suit TPU ``device_kinds``.

  ``'TPU v4'`` -> ``'v4'``, ``'TPU v5 lite'`` -> ``'v5e'``, ``'TPU v6 lite'``
  -> ``'v6e'``; a TPU kind without defaults here (e.g. ``'TPU v5'``, v5p)
  gets ``'v4'``'s, the smallest VMEM budget; several kinds the smallest of
  theirs; no TPU kind ``None`` (the default generation).

  Examples:
    >>> from pallas_kernels.conv_tpu_config import generation_of
    >>> generation_of(['TPU v4']), generation_of(['TPU v5 lite']), generation_of([])
    ('v4', 'v5e', None)
  """
  found = set()
  for kind in device_kinds:
    k = kind.lower()
    if not k.startswith('tpu'):
      continue
    if 'v5 lite' in k or 'v5e' in k:
      found.add('v5e')
    elif 'v6' in k:
      found.add('v6e')
    else:
      found.add('v4')
  if not found:
    return None
  return min(found, key=lambda g: GENERATIONS[g].vmem_budget_bytes)


def _check_multiple(owner, name, value, multiple, allow_none=False):
  if allow_none and value is None:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (
      value % multiple):
    what = (f'a positive multiple of {multiple} (Mosaic tiling)'
            if multiple > 1 else 'a positive int')
    raise ValueError(f'{owner}.{name} must be {what}, got {value!r}.')


def _check_bool(owner, name, value):
  if not isinstance(value, bool):
    raise ValueError(f'{owner}.{name} must be a bool, got {value!r}.')


def _check_vmem(owner, value):
  if value is not None and (isinstance(value, bool) or
                            not isinstance(value, int) or value < _MIB):
    raise ValueError(f'{owner}.vmem_limit_bytes must be None or an int of at '
                     f'least 1 MiB, got {value!r}.')


def padded_batch(n: int, block_n: int) -> tuple[int, int]:
  """``(n_pad, block)``: the whole batch if it fits one block."""
  if n <= block_n:
    return n, n
  return _util.round_up(n, block_n), block_n


def padded_lane_axis(size: int, multiple: int, block: int) -> tuple[int, int]:
  """``(size_pad, block)`` of an axis that is a lane axis of a kernel block.

  Padded to ``multiple`` and kept whole when that fits one block, else padded
  to a multiple of ``block`` (itself a multiple of 128).
  """
  small = _util.round_up(size, multiple)
  if small <= block:
    return small, small
  return _util.round_up(size, block), block


def reads_channels_on_lanes(n: int, groups: int = 1) -> bool:
  """Whether a ``channels_on_lanes`` config takes the small-batch path.

  Below one lane block of images, a multiple of 8 and ungrouped, the kernels
  read the activation (and cotangent) as ``(H, W, N, C)`` and transpose row
  strips into the lanes in VMEM; other small batches build the strips in
  HBM. The configs' VMEM estimates and defaults and the kernels' dispatch
  all ask this.

  Examples:
    >>> reads_channels_on_lanes(32), reads_channels_on_lanes(32, groups=2)
    (True, False)
    >>> reads_channels_on_lanes(12), reads_channels_on_lanes(128)
    (False, False)
  """
  return n < LANES and n % 8 == 0 and groups == 1


def row_block(size: int, most: int) -> int:
  """The largest divisor of ``size`` up to ``most`` (rows per grid step)."""
  for r in range(min(most, size), 0, -1):
    if size % r == 0:
      return r
  return 1


def _read_bucket(reads: float) -> int:
  """HBM reads of an operand, in steps of 15 %: configs within one step read
  about as much, and the one with the smallest VMEM footprint is taken
  (VMEM a kernel reserves is not available to XLA around it)."""
  return round(math.log(reads) / math.log(1.15))


def _lanes(n):
  return _util.round_up(n, LANES)


def _budget_limit(gen, est):
  limit = min(gen.vmem_bytes * 3 // 4, max(16 * _MIB, 2 * est))
  return _util.round_up(limit, _MIB)


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
  """Tiling of the patch-free forward ``y = -sum |xpad - w|`` on TPU.

  Attributes:
    block_n: images (x row strips) per block (lanes), a multiple of 128 (at
      most ``block_n`` lanes are one whole block).
    block_t: output channels per grid step (sublanes of the resident output
      block), a multiple of 8: the activation rows are read from HBM once per
      ``block_t`` channels, so the defaults take all of ``T`` that fits.
    block_c: input channels per reduction step (lanes of the kernel block), a
      multiple of 128 (fewer channels are one whole block).
    sub_t: output channels per register accumulator inside a step (a
      multiple of 8; the largest divisor of ``block_t`` up to it is used):
      ``sub_t / 8`` vregs per 128 lanes.
    block_r: output rows per grid step (the largest divisor of the output
      height up to it is used). A step copies the ``(block_r - 1) * stride +
      (KH - 1) * dilation + 1`` input rows it reads into VMEM once, so the
      activation is read ``1 + (KH - stride) / block_r`` times, not ``KH``.
    channels_on_lanes: for a small batch (fewer than 128 images, a multiple
      of 8, one group): read the activation as ``(H, W, N, C)`` (channels on
      the lanes, XLA's own small-batch layout) and transpose each step's
      window in VMEM (``True``), or fold zero-padded row strips into the
      lanes in HBM first, a copy of the activation (``False``; fewer VMEM
      bytes). Ignored for full lane blocks.
    vmem_limit_bytes: scoped VMEM limit for Mosaic (``None``: its default).

  Examples:
    >>> from pallas_kernels.conv_tpu_config import ForwardConfig
    >>> ForwardConfig.get_default(n=128, h=34, w=34, c=16, t=16, kh=3, kw=3,
    ...                           oh=32, ow=32)
    ForwardConfig(block_n=128, block_t=16, block_c=128, sub_t=16, block_r=8, channels_on_lanes=True, vmem_limit_bytes=16777216)
    >>> ForwardConfig(block_c=100)
    Traceback (most recent call last):
    ...
    ValueError: ForwardConfig.block_c must be a positive multiple of 128 (Mosaic tiling), got 100.
  """
  block_n: int = 128
  block_t: int = 256
  block_c: int = 512
  sub_t: int = 32
  block_r: int = 8
  channels_on_lanes: bool = True
  vmem_limit_bytes: int | None = None

  def __post_init__(self):
    owner = type(self).__name__
    _check_multiple(owner, 'block_n', self.block_n, LANES)
    _check_multiple(owner, 'block_t', self.block_t, 8)
    _check_multiple(owner, 'block_c', self.block_c, LANES)
    _check_bool(owner, 'channels_on_lanes', self.channels_on_lanes)
    _check_multiple(owner, 'sub_t', self.sub_t, 8)
    _check_multiple(owner, 'block_r', self.block_r, 1)
    _check_vmem(owner, self.vmem_limit_bytes)

  def vmem_estimate(self, *, n, w, c, t, kh, kw, ow, itemsize=4, h=None,
                    sh=1, dh=1) -> int:
    """VMEM bytes of one grid step (lane/sublane padded): the input window
    (single-buffered, copied by the kernel) and the double-buffered kernel
    and output blocks. ``h`` caps the window's rows (``None``: no cap)."""
    _, bn = padded_batch(n, self.block_n)
    _, bc = padded_lane_axis(c, SUBLANES, self.block_c)
    bt = min(self.block_t, _util.round_up(t, 8))
    rows = (self.block_r - 1) * sh + (kh - 1) * dh + 1
    rows = rows if h is None else min(rows, h)
    w_block = kh * kw * bt * _lanes(bc) * 4
    if self.channels_on_lanes and reads_channels_on_lanes(n):
      # Small batch (row strips in the lanes, channels-on-lanes operands):
      # the copied rows (S*N <= 128 images x strips, channels on the
      # lanes), their transposed f32 window, the f32 accumulator and the
      # double-buffered output block (output channels on the lanes).
      raw = rows * w * LANES * _lanes(bc) * itemsize
      window = rows * w * _util.round_up(bc, SUBLANES) * LANES * 4
      acc = self.block_r * ow * bt * LANES * 4
      out = self.block_r * ow * LANES * _lanes(bt) * 4
      return raw + window + acc + 2 * (out + w_block)
    window = rows * w * _util.round_up(bc, SUBLANES) * _lanes(bn) * itemsize
    out = self.block_r * ow * bt * _lanes(bn) * 4
    return window + 2 * (out + w_block)

  @classmethod
  def get_default(cls, *, n, h, w, c, t, kh, kw, oh, ow, itemsize=4,
                  generation: str | None = None, sh=1, dh=1,
                  groups=1) -> 'ForwardConfig':
    """Of the blocks that fit the VMEM budget, those that read the
    activation from HBM the fewest times (within 15 %), and of these the
    one with the smallest VMEM footprint; the smallest footprint if none
    fits. A small batch reads its activation in place
    (``channels_on_lanes``) when some blocks fit that way.

    Args:
      n: batch (lanes before the row strips).
      h, w: padded input height and width.
      c, t: input and output channels per group.
      kh, kw, oh, ow: kernel and output spatial sizes.
      itemsize: bytes per activation element.
      generation: ``'v4'``, ``'v5e'`` (default) or ``'v6e'``.
      sh, dh: vertical stride and dilation.
      groups: feature groups (grouped layers never read with the channels
        on the lanes, see :func:`reads_channels_on_lanes`).
    """
    gen = get_generation(generation)
    t8 = _util.round_up(t, 8)
    sub_t = min(gen.block_t, t8)
    candidates = []
    small = reads_channels_on_lanes(n, groups)
    # A grouped small batch takes the HBM strips: estimate it that way.
    for on_lanes in (True, False) if small else (
        not reads_channels_on_lanes(n),):
      for block_r in sorted({row_block(oh, r) for r in (8, 4, 2, 1)}):
        for block_t in sorted({t8, 512, 256, 128, 64, 32, 8}):
          if block_t > t8 or (small and on_lanes and block_t < t8 and
                              block_t % LANES):
            continue      # channels on lanes: the output's lanes are T
          for block_c in (128, 256, 512):
            cfg = cls(block_t=block_t, block_c=block_c, sub_t=sub_t,
                      block_r=block_r, channels_on_lanes=on_lanes)
            est = cfg.vmem_estimate(n=n, w=w, c=c, t=t, kh=kh, kw=kw,
                                    ow=ow, itemsize=itemsize, h=h, sh=sh,
                                    dh=dh)
            rows = min((block_r - 1) * sh + (kh - 1) * dh + 1, h)
            # Activation reads: one window per row block and T block.
            reads = -(-t8 // block_t) * rows / block_r
            fits = est <= gen.vmem_budget_bytes
            candidates.append(((not fits, fits and small and not on_lanes,
                                _read_bucket(reads) if fits else 0, est),
                               cfg, est))
    _, cfg, est = min(candidates, key=lambda c: c[0])
    return dataclasses.replace(cfg, vmem_limit_bytes=_budget_limit(gen, est))


@dataclasses.dataclass(frozen=True)
class InputGradConfig:
  """Tiling of the patch-free input gradient on TPU.

  Attributes:
    block_n: images (x row strips) per block (lanes), a multiple of 128 (at
      most ``block_n`` lanes are one whole block).
    block_c: input channels per grid step (sublanes of the resident output
      block), a multiple of 16: the cotangent rows are read from HBM once per
      ``block_c`` channels, so the defaults take all of ``C`` that fits.
    block_t: output channels per reduction step (lanes of the kernel block),
      a multiple of 128 (fewer channels are one whole block).
    sub_c: input channels per register accumulator inside a step (a multiple
      of 16; the largest divisor of ``block_c`` up to it is used).
    block_r: input rows per grid step (the largest divisor of the input
      height up to it is used); the step copies the cotangent rows they
      read into VMEM once.
    channels_on_lanes: for a small batch (fewer than 128 images, a multiple
      of 8, one group): read the activation and cotangent as ``(H, W, N,
      C)`` in place and transpose their windows in VMEM (``True``), or copy
      them into row strips in HBM first (``False``); as
      :attr:`ForwardConfig.channels_on_lanes`.
    vmem_limit_bytes: scoped VMEM limit for Mosaic (``None``: its default).

  Examples:
    >>> from pallas_kernels.conv_tpu_config import InputGradConfig
    >>> InputGradConfig.get_default(n=128, h=32, w=32, c=16, t=16, kh=3,
    ...                             kw=3, oh=32, ow=32)
    InputGradConfig(block_n=128, block_c=16, block_t=128, sub_c=64, block_r=8, channels_on_lanes=True, vmem_limit_bytes=23068672)
  """
  block_n: int = 128
  block_c: int = 256
  block_t: int = 128
  sub_c: int = 64
  block_r: int = 8
  channels_on_lanes: bool = True
  vmem_limit_bytes: int | None = None

  def __post_init__(self):
    owner = type(self).__name__
    _check_multiple(owner, 'block_n', self.block_n, LANES)
    _check_multiple(owner, 'block_c', self.block_c, SUBLANES)
    _check_multiple(owner, 'block_t', self.block_t, LANES)
    _check_multiple(owner, 'sub_c', self.sub_c, SUBLANES)
    _check_multiple(owner, 'block_r', self.block_r, 1)
    _check_bool(owner, 'channels_on_lanes', self.channels_on_lanes)
    _check_vmem(owner, self.vmem_limit_bytes)

  def vmem_estimate(self, *, n, w, c, t, kh, kw, ow, itemsize=4, oh=None,
                    sh=1, dh=1) -> int:
    """VMEM bytes of one grid step (lane/sublane padded): the cotangent
    window (single-buffered, copied by the kernel; ``oh`` caps its rows) and
    the double-buffered activation, kernel and output blocks."""
    _, bn = padded_batch(n, self.block_n)
    bc = min(self.block_c, _util.round_up(c, SUBLANES))
    _, bt = padded_lane_axis(t, 8, self.block_t)
    rows = (self.block_r - 1 + (kh - 1) * dh) // sh + 1
    w_block = kh * kw * bc * _lanes(bt) * 4
    if self.channels_on_lanes and reads_channels_on_lanes(n):
      # Small batch, channels on the lanes: the copied cotangent and
      # activation rows (S*N <= 128 lanes' worth), their transposed f32
      # windows, the f32 accumulator and the double-buffered output block.
      bc = min(_util.round_up(c, SUBLANES), _util.round_up(bc, LANES))
      w_block = kh * kw * bc * _lanes(bt) * 4
      raw_g = (rows if oh is None else min(rows, oh)) * ow * LANES * _lanes(
          bt) * 4
      raw_x = self.block_r * w * LANES * _lanes(bc) * itemsize
      g_win = rows * ow * _util.round_up(bt, 8) * LANES * 4
      x_win = self.block_r * w * bc * LANES * 4
      out = self.block_r * w * LANES * _lanes(bc) * 4
      return raw_g + raw_x + g_win + 2 * x_win + 2 * (out + w_block)
    rows = rows if oh is None else min(rows, oh)
    x_block = self.block_r * w * bc * _lanes(bn) * itemsize
    out = self.block_r * w * bc * _lanes(bn) * 4
    window = rows * ow * _util.round_up(bt, 8) * _lanes(bn) * 4
    # The strip path's lane mask, one (8-sublane padded) row per output row.
    mask = (oh if oh is not None else rows) * 8 * _lanes(bn) * 4
    return window + mask + 2 * (x_block + out + w_block)

  @classmethod
  def get_default(cls, *, n, h, w, c, t, kh, kw, oh, ow, itemsize=4,
                  generation: str | None = None, sh=1, dh=1,
                  groups=1) -> 'InputGradConfig':
    """Of the blocks that fit the VMEM budget, those that read the
    cotangent from HBM the fewest times (within 15 %), and of these the one
    with the smallest VMEM footprint; the smallest footprint if none fits.

    Args: as :meth:`ForwardConfig.get_default` (``h``, ``w`` unpadded).
    """
    gen = get_generation(generation)
    c16 = _util.round_up(c, SUBLANES)
    candidates = []
    small = reads_channels_on_lanes(n, groups)
    # A grouped small batch takes the HBM strips: estimate it that way.
    for on_lanes in (True, False) if small else (
        not reads_channels_on_lanes(n),):
      for block_r in sorted({row_block(h, r) for r in (8, 4, 2, 1)}):
        for block_c in sorted({c16, 512, 256, 128, 64, 32, 16}):
          if block_c > c16 or (small and on_lanes and block_c < c16 and
                               block_c % LANES):
            continue      # channels on lanes: the output's lanes are C
          cfg = cls(block_c=block_c, block_t=128, block_r=block_r,
                    channels_on_lanes=on_lanes)
          est = cfg.vmem_estimate(n=n, w=w, c=c, t=t, kh=kh, kw=kw, ow=ow,
                                  itemsize=itemsize, oh=oh, sh=sh, dh=dh)
          rows = min((block_r - 1 + (kh - 1) * dh) // sh + 1, oh)
          # Cotangent reads: one window per row block and C block.
          reads = -(-c16 // block_c) * rows / block_r
          fits = est <= gen.vmem_budget_bytes
          candidates.append(((not fits, fits and small and not on_lanes,
                              _read_bucket(reads) if fits else 0, est),
                             cfg, est))
    _, cfg, est = min(candidates, key=lambda c: c[0])
    return dataclasses.replace(cfg, vmem_limit_bytes=_budget_limit(gen, est))


def fits_vmem(*, n, h, w, c, t, kh, kw, oh, ow, itemsize=4, sh=1, dh=1,
              padding=((0, 0), (0, 0)),
              generation: str | None = None) -> bool:
  """Whether the default forward and input-gradient blocks of a layer fit
  the generation's VMEM budget (``h``, ``w`` unpadded; ``padding`` the
  forward's ``((lo, hi), (lo, hi))``).

  A layer whose smallest step does not fit (e.g. a 56-wide, 128-channel
  layer on v4, whose 3-row window alone is 11 MiB of its 16) cannot run the
  patch-free kernels there.

  Examples:
    >>> from pallas_kernels.conv_tpu_config import fits_vmem
    >>> layer = dict(n=8, h=56, w=56, c=128, t=128, kh=3, kw=3, oh=28, ow=28,
    ...              sh=2, padding=((1, 1), (1, 1)))
    >>> fits_vmem(**layer, generation='v5e'), fits_vmem(**layer, generation='v4')
    (True, False)
  """
  budget = get_generation(generation).vmem_budget_bytes
  hp, wp = h + sum(padding[0]), w + sum(padding[1])
  common = dict(n=n, c=c, t=t, kh=kh, kw=kw, ow=ow, itemsize=itemsize, sh=sh,
                dh=dh)
  fwd = ForwardConfig.get_default(h=hp, w=wp, oh=oh, generation=generation,
                                  **common)
  dx = InputGradConfig.get_default(h=h, w=w, oh=oh, generation=generation,
                                   **common)
  return (fwd.vmem_estimate(w=wp, h=hp, **common) <= budget and
          dx.vmem_estimate(w=w, oh=oh, **common) <= budget)
