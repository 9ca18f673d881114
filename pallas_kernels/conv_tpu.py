"""Patch-free adder (l1) convolution kernels for TPUs (Pallas Mosaic).

No patch matrix: each grid step reads image rows (with their halo) straight
from the activation into VMEM and walks the kernel taps in-kernel (implicit
im2col).

Layout. The activation is viewed as ``(H, W, G, C, L)``: **the lanes are
images**, the channels are sublanes and the spatial position is an untiled
leading dim. For an aligned batch (``N`` a multiple of 128, ``C`` of 16, one
group) this is NHWC in XLA's batch-minor TPU layout, so the transpose is a
bitcast and the kernel reads the activation in place. A grid step computes
``block_r`` output rows: it copies the input rows they read (``(block_r - 1)
* sh + (KH - 1) * dh + 1`` rows, the window clamped into the image) from HBM
into VMEM with one DMA, so the activation is read about ``1 + (KH - sh) /
block_r`` times. Zero padding is never materialised: a tap ``(i, j)`` of
output ``(oh, ow)`` reads row ``oh*sh + i*dh - ph`` and column ``ow*sw +
j*dw - pw`` of the window (a dynamic leading-dim index, no lane or sublane
shift, so strides and dilations cost nothing), and a tap that falls on the
padding adds ``sum_c |w[tap, c, t]|`` (what ``|0 - w|`` would add) instead.

Small batches (space-to-batch). With ``N < 128`` images a lane block would be
mostly empty (and Mosaic pads the lane dim of the HBM copy to 128: 4x the
activation at N = 32). So ``P = 128 // N`` horizontal strips of the image are
folded into the lanes: lane ``s*N + n`` holds output rows ``[s*R, (s+1)*R)``
of image ``n`` (56x56 at N=32: 4 strips of 14 rows). For ``N`` a multiple of
8 and one group (``channels_on_lanes``, the default where it fits VMEM) the
kernels read the activation and cotangent in place as ``(H, W, N, C)`` --
channels on the lanes, a layout XLA keeps for small batches -- copy each
strip's rows into VMEM and transpose every window position there (one
``(P*N, C) -> (C, 128)`` transpose per position, amortised over all taps and
output channels); results are transposed back the same way, so nothing is
copied in HBM. Otherwise (or with ``channels_on_lanes=False``) the strips
are a zero-padded copy in HBM with ``(KH-1)*dh - sh + 1`` halo rows (1.1x the
activation), and the input gradient drops the cotangent strip rows that are
not real outputs of a lane's strip by a per-lane mask (a select, so NaN
stays local).

Forward: grid ``(G, L-blocks, T-blocks, row-blocks, C-blocks)``; the output
rows ``(block_r, OW, bt, bl)`` stay resident over the ``C`` steps. For each
output column the ``(bt, bl)`` accumulator (``bt/8 * bl/128`` vregs: 4 at 32
x 128) takes ``|w[tap, t, c] - x[col, c, l]|`` for every tap and channel: a
sublane broadcast of an activation row and a lane broadcast of a kernel
column, as in :mod:`pallas_kernels.adder_tpu`. 3 VPU ops per l1 term (vsub,
vand for the absolute value, vadd). Roofline with docs/roofline.md's v5e
figures (3.1e12 vector ops/s, 0.82 TB/s): a ResNet-20 3x3 16->16 layer at
batch 128 is 302 M terms, ~0.29 ms of VPU work, while its HBM traffic (the
activation read ~1.25 times, the output written once, ~18 MB) is ~0.02 ms:
compute bound, as is every adder layer with ``T >= 16``.

Input gradient (gather form): grid ``(G, L-blocks, C-blocks, row-blocks,
T-blocks)``; a step copies the cotangent rows its ``block_r`` input rows are
read by into VMEM (one DMA per ``T`` step). Input row ``h`` pulls, for tap
row ``i``, cotangent row ``oh = (h + ph - i*dh) / sh`` (the tap is skipped
under ``pl.when`` unless it is an integer inside ``[0, OH)``, so stride-2
layers do a quarter of the taps per row). For each input column and tap,
``sum_t g[oh, ow, t, l] h(w[tap, c, t] - x[h, w, c, l])`` is added to the
resident output row: an input read by no output keeps exactly 0 and a NaN
reaches exactly the positions that read it. 4-5 VPU ops per term (sub,
clip or compare/select, multiply, add).

VMEM: one step holds the copied window (single-buffered), the output rows
and the kernel block (double-buffered); the configs
(:mod:`pallas_kernels.conv_tpu_config`) pick the most rows per step, then the
widest channel blocks, that fit the generation, and set
``vmem_limit_bytes``. HBM temporaries: none for an aligned full-lane batch
(the kernels read the activation and cotangent in place and write their
results in the layout XLA keeps), nor for a small batch read with the
channels on the lanes; the HBM row strips are one copy of the activation
(and of the cotangent). The sweep of
``tests/test_pallas_conv_lowering.py`` prints per-layer temp memory and bytes
of the v5e compile next to the patch kernels' and ``lax.conv``'s.

Limits: depthwise layers pad their one channel per group to 16 sublanes
(16x the work); the lanes are images x strips, so ``N * OH < 128`` leaves
lanes idle.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _conv_util
from pallas_kernels import _util
from pallas_kernels.conv_spec import ConvSpecLike
from pallas_kernels.conv_tpu_config import ForwardConfig
from pallas_kernels.conv_tpu_config import InputGradConfig
from pallas_kernels.conv_tpu_config import LANES
from pallas_kernels.conv_tpu_config import SUBLANES
from pallas_kernels.conv_tpu_config import padded_batch
from pallas_kernels.conv_tpu_config import padded_lane_axis
from pallas_kernels.conv_tpu_config import reads_channels_on_lanes
from pallas_kernels.conv_tpu_config import row_block

_F32 = jnp.float32


def _to_hwgcn(x, groups, c_pad, pads=((0, 0), (0, 0))):
  """``(N, H, W, G*C)`` -> zero-padded ``(H', W', G, C_pad, N)``."""
  n, h, w, _ = x.shape
  x = x.reshape(n, h, w, groups, -1)
  c = x.shape[-1]
  x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0), (0, c_pad - c)))
  return jnp.transpose(x, (1, 2, 3, 4, 0))


def _strip_count(n: int, rows: int, block_n: int) -> int:
  """Row strips folded into the lanes so that a small batch fills them."""
  return max(1, min(block_n // n, rows)) if n < block_n else 1


def _to_strips(a, count, step, rows):
  """``(H, ...rest, N)`` -> ``(rows, ...rest, count*N)``, strip ``s`` being
  rows ``[s*step, s*step + rows)`` (zero rows past the end); lane
  ``s*N + n`` holds strip ``s`` of image ``n`` (space-to-batch)."""
  need = (count - 1) * step + rows
  if a.shape[0] < need:
    a = jnp.pad(a, ((0, need - a.shape[0]),) + ((0, 0),) * (a.ndim - 1))
  if count == 1:
    return a[:rows]
  a = jnp.stack([a[k * step:k * step + rows] for k in range(count)], -2)
  return a.reshape(a.shape[:-2] + (-1,))


def _from_strips(y, count, n, rows, c):
  """Kernel output ``(R, W, G, C_pad, L_pad)`` -> ``(N, rows, W, G*C)``."""
  r, w, g = y.shape[:3]
  y = y[:, :, :, :c, :count * n].reshape(r, w, g, c, count, n)
  y = jnp.transpose(y, (5, 4, 0, 1, 2, 3)).reshape(n, count * r, w, g * c)
  return y[:, :rows]


def _pad_lanes(a, size):
  return _util.pad_to(a, a.ndim - 1, size)


# --- forward ----------------------------------------------------------------


def _sub_block(size: int, most: int, unit: int) -> int:
  """Largest multiple of ``unit`` up to ``most`` that divides ``size``."""
  for b in range(min(most, size), 0, -unit):
    if size % b == 0 and b % unit == 0:
      return b
  return size


def _sub_blocks(size: int, block: int, fn, carry):
  """``fn(offset, carry)`` over ``size // block`` sub-blocks (aligned)."""
  count = size // block
  if count == 1:
    return fn(0, carry)
  return lax.fori_loop(
      0, count, lambda k, c: fn(pl.multiple_of(k * block, block), c), carry)


def _block(ref, axis, index, size):
  """Block ``index`` of ``size`` along a tiled ``axis`` of an HBM ref: the
  whole axis when it is one block (then possibly not 128-aligned), else an
  aligned dynamic slice (the blocks are then multiples of 128)."""
  if ref.shape[axis] == size:
    return slice(None)
  return pl.ds(pl.multiple_of(index * size, size), size)


def _tap_weight_l1(wt_ref, tap_index, t0, sub_t):
  """``sum_c |w[tap, t, c]|`` of a step's channels, as ``(sub_t, 1)``: what a
  tap over the zero padding adds (``|0 - w|``)."""
  wt = wt_ref[tap_index, pl.ds(t0, sub_t), :]
  return jnp.sum(jnp.abs(wt), axis=1, keepdims=True)


def _forward_kernel(x_hbm, wt_ref, o_ref, window, sem, *, kh, kw, sh, sw, dh,
                    dw, ph, pw, h, w, rows_out, ow_count, sub_t):
  """One ``(g, n-block, t-block, row-block, c-block)`` step.

  ``x_hbm`` is the whole (unpadded) activation ``(H, W, G, C, L)`` in HBM;
  the step copies the ``window.shape[0]`` rows its ``rows_out`` output rows
  read (clamped into the image) into VMEM once. ``wt_ref`` is the transposed
  kernel ``(KH*KW, bt, bc)`` float32 and ``o_ref`` the output rows
  ``(rows_out, OW, bt, bn)`` float32, which hold ``sum |x - w|`` until the
  last channel step turns them into ``0 - sum``. A tap that falls on the
  zero padding adds ``sum_c |w|`` instead of reading the window. The ``bt``
  channels of a step are walked in register-sized sub-blocks of ``sub_t``.
  """
  g, nb, rb, cb = (pl.program_id(0), pl.program_id(1), pl.program_id(3),
                   pl.program_id(4))
  rows_in, _, bc, bn = window.shape
  first = rb * (rows_out * sh) - ph
  start = jnp.minimum(jnp.maximum(first, 0), h - rows_in)
  copy = pltpu.make_async_copy(
      x_hbm.at[pl.ds(start, rows_in), :, g, _block(x_hbm, 3, cb, bc),
               _block(x_hbm, 4, nb, bn)],
      window, sem)
  copy.start()

  @pl.when(pl.program_id(4) == 0)
  def _init():
    o_ref[...] = jnp.zeros(o_ref.shape, _F32)

  copy.wait()

  def out_row(r, carry):
    oh = rb * rows_out + r
    rows = [oh * sh + i * dh - ph for i in range(kh)]
    row_ok = [(row >= 0) & (row < h) for row in rows]
    local = [jnp.minimum(jnp.maximum(row - start, 0), rows_in - 1)
             for row in rows]

    def column(ow, carry):
      def t_block(t0, carry):
        acc = o_ref[r, ow, pl.ds(t0, sub_t), :]               # (sub_t, bn)
        for i in range(kh):
          def tap(j, acc, i=i):
            col = ow * sw + j * dw - pw
            tap_index = i * kw + j

            def read(acc):
              src = jnp.minimum(jnp.maximum(col, 0), w - 1)

              def chunk(off, size, acc):
                wt = wt_ref[tap_index, pl.ds(t0, sub_t), pl.ds(off, size)]
                for r0 in range(0, size, SUBLANES):
                  xs = window[local[i], src, pl.ds(off + r0, SUBLANES),
                              :].astype(_F32)
                  for q in range(SUBLANES):
                    acc = acc + jnp.abs(wt[:, r0 + q:r0 + q + 1] -
                                        xs[q:q + 1, :])
                return acc
              return _util.lane_chunks(bc, LANES, chunk, acc)

            def padded(acc):
              return acc + _tap_weight_l1(wt_ref, tap_index, t0, sub_t)

            ok = row_ok[i] & (col >= 0) & (col < w)
            return lax.cond(ok, read, padded, acc)
          acc = tap(0, acc) if kw == 1 else lax.fori_loop(0, kw, tap, acc)
        o_ref[r, ow, pl.ds(t0, sub_t), :] = acc
        return carry
      return _sub_blocks(o_ref.shape[2], sub_t, t_block, carry)

    return lax.fori_loop(0, ow_count, column, carry)

  lax.fori_loop(0, rows_out, out_row, 0)

  @pl.when(pl.program_id(4) == pl.num_programs(4) - 1)
  def _finish():
    o_ref[...] = 0.0 - o_ref[...]


def _start_strip_copies(hbm, starts, rows, lanes, dst, sems):
  """Starts one DMA per strip ``k``: rows ``[starts[k], starts[k] + rows)``
  of the ``(H, W, N, C)`` array ``hbm`` (lane block ``lanes``) into
  ``dst[k]``. Returns the copies (to ``wait`` on)."""
  copies = [pltpu.make_async_copy(hbm.at[pl.ds(start, rows), :, :, lanes],
                                  dst.at[k], sems.at[k])
            for k, start in enumerate(starts)]
  for copy in copies:
    copy.start()
  return copies


def _strips_to_lanes(pieces, lanes):
  """``(N, b)`` pieces, one per strip -> ``(b, lanes)`` float32, lane
  ``k*N + n`` from piece ``k`` (zero lanes past the last): one VMEM
  transpose."""
  n, b = pieces[0].shape
  pieces = [p.astype(_F32) for p in pieces]
  if len(pieces) * n < lanes:
    pieces.append(jnp.zeros((lanes - len(pieces) * n, b), _F32))
  return jnp.concatenate(pieces, axis=0).T


def _lanes_to_strips(y, strips, n):
  """``(b, 128)`` with lanes ``k*N + n`` -> ``(strips, N, b)``."""
  return y.T[:strips * n].reshape(strips, n, -1)


def _hwnc_forward_kernel(x_hbm, wt_ref, o_ref, raw, win, acc, sem, *,
                        strips, oh_k, kh, kw, sh, sw, dh, dw, ph, pw, h, w,
                        rows_out, ow_count, sub_t):
  """One ``(t-block, row-block, c-block)`` step of the small-batch forward.

  ``x_hbm`` is the unpadded activation ``(H, W, N, C)`` in HBM (channels on
  the lanes, XLA's small-batch layout). For each of the ``strips`` row
  strips the step copies the image rows its ``rows_out`` output rows read
  (clamped into the image) into ``raw`` ``(S, rows, W, N, bc)``, then
  transposes every window position in VMEM into ``win`` ``(rows, Wp, bc,
  128)``, whose lanes are ``strip * N + image`` and whose out-of-image rows
  and columns are exact zeros (the padding). The taps then run as in
  :func:`_forward_kernel` on the accumulator ``acc`` ``(rows_out, OW, bt,
  128)``; the last channel step transposes it back into ``o_ref``
  ``(S, rows_out, OW, N, bt)`` (output channels on the lanes).
  """
  rb, cb = pl.program_id(1), pl.program_id(2)
  raw_rows, n, bc = raw.shape[1], raw.shape[3], raw.shape[4]
  win_rows, win_cols = win.shape[0], win.shape[1]
  firsts = [(k * oh_k + rb * rows_out) * sh - ph for k in range(strips)]
  starts = [jnp.minimum(jnp.maximum(f, 0), h - raw_rows) for f in firsts]
  copies = _start_strip_copies(x_hbm, starts, raw_rows,
                               _block(x_hbm, 3, cb, bc), raw, sem)

  @pl.when(cb == 0)
  def _init():
    acc[...] = jnp.zeros(acc.shape, _F32)

  for copy in copies:
    copy.wait()

  lanes = win.shape[3]
  zeros = jnp.zeros((n, bc), raw.dtype)

  def win_row(r, carry):
    rows = [f + r for f in firsts]
    row_ok = [(row >= 0) & (row < h) for row in rows]
    local = [jnp.minimum(jnp.maximum(row - st, 0), raw_rows - 1)
             for row, st in zip(rows, starts)]

    def win_col(col, carry):
      src = col - pw
      col_ok = (src >= 0) & (src < w)
      src = jnp.minimum(jnp.maximum(src, 0), w - 1)
      win[r, col] = _strips_to_lanes(
          [jnp.where(row_ok[k] & col_ok, raw[k, local[k], src], zeros)
           for k in range(strips)], lanes)
      return carry
    return lax.fori_loop(0, win_cols, win_col, carry)

  lax.fori_loop(0, win_rows, win_row, 0)

  def out_row(r, carry):
    def column(ow, carry):
      def t_block(t0, carry):
        a = acc[r, ow, pl.ds(t0, sub_t), :]                   # (sub_t, 128)
        for i in range(kh):
          row = r * sh + i * dh

          def tap(j, a, i=i, row=row):
            col = ow * sw + j * dw
            tap_index = i * kw + j

            def chunk(off, size, a):
              wt = wt_ref[tap_index, pl.ds(t0, sub_t), pl.ds(off, size)]
              for r0 in range(0, size, SUBLANES):
                xs = win[row, col, pl.ds(off + r0, SUBLANES), :]
                for q in range(SUBLANES):
                  a = a + jnp.abs(wt[:, r0 + q:r0 + q + 1] - xs[q:q + 1, :])
              return a
            return _util.lane_chunks(bc, LANES, chunk, a)
          a = tap(0, a) if kw == 1 else lax.fori_loop(0, kw, tap, a)
        acc[r, ow, pl.ds(t0, sub_t), :] = a
        return carry
      return _sub_blocks(acc.shape[2], sub_t, t_block, carry)
    return lax.fori_loop(0, ow_count, column, carry)

  lax.fori_loop(0, rows_out, out_row, 0)

  @pl.when(cb == pl.num_programs(2) - 1)
  def _finish():
    def row(r, carry):
      def column(ow, carry):
        o_ref[:, r, ow] = _lanes_to_strips(0.0 - acc[r, ow], strips, n)
        return carry
      return lax.fori_loop(0, ow_count, column, carry)
    lax.fori_loop(0, rows_out, row, 0)


def _hwnc_forward(x, w, geo, cfg, strips, *, interpret):
  """The small-batch forward on ``(H, W, N, C)`` (see
  :func:`_hwnc_forward_kernel`); ``geo.groups == 1``, ``N`` a multiple of 8
  and ``strips * N <= 128``. Returns ``(N, OH, OW, T)`` float32."""
  s = geo.spec
  (ph0, _), (pw0, pw1) = s.padding
  sh, sw = s.strides
  dh, dw = s.dilation
  c_pad, bc = padded_lane_axis(geo.c, SUBLANES, cfg.block_c)
  t8 = _util.round_up(geo.t, 8)
  # The output block's lanes are output channels: all of them, or a
  # multiple of 128.
  bt = min(t8, _util.round_up(cfg.block_t, LANES))
  t_pad = _util.round_up(geo.t, bt)
  taps = geo.kh * geo.kw
  oh_k = -(-geo.oh // strips)                    # output rows per strip
  strips = -(-geo.oh // oh_k)
  rows_out = row_block(oh_k, cfg.block_r)
  win_rows = (rows_out - 1) * sh + (geo.kh - 1) * dh + 1
  raw_rows = min(win_rows, geo.h)
  win_cols = geo.w + pw0 + pw1
  xt = jnp.transpose(_util.pad_to(x, 3, c_pad), (1, 2, 0, 3))  # (H, W, N, C)
  wt = w.astype(_F32).reshape(taps, geo.c, geo.t)
  wt = jnp.transpose(wt, (0, 2, 1))                            # (taps, T, C)
  wt = jnp.pad(wt, ((0, 0), (0, t_pad - geo.t), (0, c_pad - geo.c)))
  grid = (t_pad // bt, oh_k // rows_out, c_pad // bc)
  kernel = functools.partial(
      _hwnc_forward_kernel, strips=strips, oh_k=oh_k, kh=geo.kh, kw=geo.kw,
      sh=sh, sw=sw, dh=dh, dw=dw, ph=ph0, pw=pw0, h=geo.h, w=geo.w,
      rows_out=rows_out, ow_count=geo.ow, sub_t=_sub_block(bt, cfg.sub_t, 8))
  steps = grid[0] * grid[1] * grid[2]
  terms = LANES * t_pad * oh_k * geo.ow * taps * c_pad
  y = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(
          (strips, oh_k, geo.ow, geo.n, t_pad), _F32),
      grid=grid,
      in_specs=[
          pl.BlockSpec(memory_space=pl.ANY),
          pl.BlockSpec((taps, bt, bc), lambda tb, rb, cb: (0, tb, cb)),
      ],
      out_specs=pl.BlockSpec((strips, rows_out, geo.ow, geo.n, bt),
                             lambda tb, rb, cb: (0, rb, 0, 0, tb)),
      scratch_shapes=[
          pltpu.VMEM((strips, raw_rows, geo.w, geo.n, bc), xt.dtype),
          pltpu.VMEM((win_rows, win_cols, bc, LANES), _F32),
          pltpu.VMEM((rows_out, geo.ow, bt, LANES), _F32),
          pltpu.SemaphoreType.DMA((strips,))],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'arbitrary'),
          vmem_limit_bytes=cfg.vmem_limit_bytes),
      cost_estimate=pl.CostEstimate(
          flops=3 * terms, transcendentals=0,
          bytes_accessed=(steps * strips * raw_rows * geo.w * geo.n * bc *
                          xt.dtype.itemsize +
                          wt.size * 4 * (grid[1] if steps > 1 else 1) +
                          4 * strips * oh_k * geo.ow * geo.n * t_pad)),
      interpret=interpret,
      name='adder_conv_forward_mosaic',
  )(xt, wt)
  y = y.reshape((strips * oh_k,) + y.shape[2:])[:geo.oh, :, :, :geo.t]
  return jnp.transpose(y, (2, 0, 1, 3))


@functools.partial(jax.jit, static_argnames=('spec', 'interpret', 'config',
                                             'generation'))
def l1_conv_forward(x: jax.Array, w: jax.Array, spec: ConvSpecLike, *,
                    interpret: bool = False,
                    config: ForwardConfig | None = None,
                    generation: str | None = None) -> jax.Array:
  """Adder conv forward, ``y = -sum |xpad[window] - w|``, without patches.

  ``y[n, oh, ow, t] = -sum_{i,j,c} |xpad[n, oh*sh + i*dh, ow*sw + j*dw, c]
  - w[i, j, c, t]|`` with zero padding (the padded zeros enter the distance);
  with groups, channel group ``g`` of ``x`` meets output channels
  ``[g*T/G, (g+1)*T/G)``.

  Args:
    x: ``(N, H, W, C)`` (or ``(N, W, C)`` with a 1-D spec), float32, bfloat16
      or float16; read as is and upcast in-kernel.
    w: ``(KH, KW, C // groups, T)`` (flax Conv layout); read as float32.
    spec: strides, padding, dilation and groups: a
      :class:`~pallas_kernels.conv_spec.ConvSpec` or a geometry with those
      attributes (``adderjax.ops.geometry.ConvGeometry``).
    interpret: run the kernel in the Pallas interpreter (any backend).
    config: block sizes; ``None`` uses
      :meth:`conv_tpu_config.ForwardConfig.get_default
      <pallas_kernels.conv_tpu_config.ForwardConfig.get_default>`.
    generation: TPU generation for the default config (``'v4'``, ``'v5e'``,
      ``'v6e'``; ``None``: v5e).

  Returns:
    ``(N, OH, OW, T)`` (or ``(N, OW, T)``) float32.

  Raises:
    TypeError, ValueError: bad operands or spec (the message names them).
    NotImplementedError: 3-D convolutions.

  Examples:
    >>> import jax.numpy as jnp
    >>> from pallas_kernels import conv_tpu
    >>> from pallas_kernels.conv_spec import ConvSpec
    >>> x = jnp.arange(4.0).reshape(1, 4, 1)          # N=1, W=4, C=1
    >>> w = jnp.ones((2, 1, 1))                       # KW=2, T=1
    >>> spec = ConvSpec(strides=(1,), padding=((0, 1),), dilation=(1,))
    >>> conv_tpu.l1_conv_forward(x, w, spec, interpret=True)[0, :, 0].tolist()
    [-1.0, -1.0, -3.0, -3.0]
  """
  x, w, _, geo, was_1d = _conv_util.check_conv_args(x, w, spec)
  s = geo.spec
  (ph0, ph1), (pw0, pw1) = s.padding
  hp, wp = geo.h + ph0 + ph1, geo.w + pw0 + pw1
  sh, sw = s.strides
  dh, dw = s.dilation
  cfg = config or ForwardConfig.get_default(
      n=geo.n, h=hp, w=wp, c=geo.c, t=geo.t, kh=geo.kh, kw=geo.kw, oh=geo.oh,
      ow=geo.ow, itemsize=x.dtype.itemsize, generation=generation, sh=sh,
      dh=dh, groups=geo.groups)
  c_pad, bc = padded_lane_axis(geo.c, SUBLANES, cfg.block_c)
  bt = min(cfg.block_t, _util.round_up(geo.t, 8))
  t_pad = _util.round_up(geo.t, bt)
  taps = geo.kh * geo.kw

  strips = _strip_count(geo.n, geo.oh, cfg.block_n)
  if (strips > 1 and cfg.channels_on_lanes and
      reads_channels_on_lanes(geo.n, geo.groups)):
    # One lane block of strips x images, whatever block_n says.
    y = _hwnc_forward(x, w, geo, cfg, min(strips, LANES // geo.n),
                      interpret=interpret)
    return y[:, 0] if was_1d else y
  if strips > 1:
    # A batch below one lane block: fold output-row strips into the lanes
    # (a copy with halo rows, zero-padded, so the kernel sees no padding).
    oh_k = -(-geo.oh // strips)                  # output rows per strip
    strips = -(-geo.oh // oh_k)
    rows_in = (oh_k - 1) * sh + (geo.kh - 1) * dh + 1
    xt = _to_hwgcn(x, geo.groups, c_pad, s.padding)        # (Hp, Wp, G, C, N)
    xt = _to_strips(xt, strips, oh_k * sh, rows_in)        # (rows, Wp, G, C, L)
    pad_h, pad_w = 0, 0
  else:
    # The activation as it is, unpadded: (H, W, G, C, N) is NHWC in XLA's
    # batch-minor TPU layout, so this transpose is free when C is aligned.
    oh_k = geo.oh
    xt = _to_hwgcn(x, geo.groups, c_pad)                   # (H, W, G, C, N)
    pad_h, pad_w = ph0, pw0
  n_pad, bn = padded_batch(strips * geo.n, cfg.block_n)
  xt = _pad_lanes(xt, n_pad)
  h_in, w_in = xt.shape[:2]
  rows_out = row_block(oh_k, cfg.block_r)
  window_rows = min((rows_out - 1) * sh + (geo.kh - 1) * dh + 1, h_in)
  wt = w.astype(_F32).reshape(taps, geo.c, geo.groups, geo.t)
  wt = jnp.transpose(wt, (2, 0, 3, 1))                      # (G, taps, T, C)
  wt = jnp.pad(wt, ((0, 0), (0, 0), (0, t_pad - geo.t), (0, c_pad - geo.c)))

  grid = (geo.groups, n_pad // bn, t_pad // bt, oh_k // rows_out,
          c_pad // bc)
  kernel = functools.partial(
      _forward_kernel, kh=geo.kh, kw=geo.kw, sh=sh, sw=sw, dh=dh, dw=dw,
      ph=pad_h, pw=pad_w, h=h_in, w=w_in, rows_out=rows_out, ow_count=geo.ow,
      sub_t=_sub_block(bt, cfg.sub_t, 8))
  steps = grid[0] * grid[1] * grid[2] * grid[3] * grid[4]
  terms = geo.groups * n_pad * t_pad * oh_k * geo.ow * taps * c_pad
  y = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(
          (oh_k, geo.ow, geo.groups, t_pad, n_pad), _F32),
      grid=grid,
      in_specs=[
          pl.BlockSpec(memory_space=pl.ANY),
          pl.BlockSpec((None, taps, bt, bc),
                       lambda g, nb, tb, rb, cb: (g, 0, tb, cb)),
      ],
      out_specs=pl.BlockSpec((rows_out, geo.ow, None, bt, bn),
                             lambda g, nb, tb, rb, cb: (rb, 0, g, tb, nb)),
      scratch_shapes=[pltpu.VMEM((window_rows, w_in, bc, bn), xt.dtype),
                      pltpu.SemaphoreType.DMA(())],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel',
                               'parallel', 'arbitrary'),
          vmem_limit_bytes=cfg.vmem_limit_bytes),
      cost_estimate=pl.CostEstimate(
          flops=3 * terms, transcendentals=0,
          # One window copy per step; the kernel block is fetched again only
          # when its index changes between consecutive steps.
          bytes_accessed=(steps * window_rows * w_in * bc * bn *
                          xt.dtype.itemsize +
                          wt.size * 4 * (grid[1] * grid[3]
                                         if grid[2] * grid[4] > 1 else 1) +
                          4 * oh_k * geo.ow * geo.groups * t_pad * n_pad)),
      interpret=interpret,
      name='adder_conv_forward_mosaic',
  )(xt, wt)
  y = _from_strips(y, strips, geo.n, geo.oh, geo.t)
  return y[:, 0] if was_1d else y


# --- input gradient ----------------------------------------------------------


def _valid_index(num, stride, count):
  """``(num / stride is an integer in [0, count), clamped index)``."""
  # lax.div / lax.rem of a non-negative value: jnp's floor division lowers
  # through sign(), whose Mosaic rule queries the (absent) device.
  nonneg = jnp.maximum(num, 0)
  q = lax.div(nonneg, stride) if stride > 1 else nonneg
  ok = (num >= 0) & (q < count)
  if stride > 1:
    ok = ok & (lax.rem(nonneg, stride) == 0)
  return ok, jnp.minimum(q, count - 1)


def _input_grad_kernel(*refs, kh, kw, sh, sw, dh, dw, ph, pw, oh_count,
                       ow_count, w_count, rows_in, mode, sub_c, masked):
  """One ``(g, n-block, c-block, row-block, t-block)`` step.

  Refs: the whole cotangent ``(OH, OW, G, T, L)`` float32 in HBM, of which
  the step copies the ``window.shape[0]`` rows its ``rows_in`` input rows
  are read by (clamped into the cotangent) into VMEM once; with row strips,
  the lane mask ``(OH, 1, bn)`` (1 where a cotangent row is a real output of
  that lane's strip); the activation rows ``(rows_in, W, bc, bn)``, the
  kernel ``(KH*KW, bc, bt)`` float32 and the output rows
  ``(rows_in, W, bc, bn)`` float32, accumulated over the ``T`` steps. The
  ``bc`` channels of a step are walked in sub-blocks of ``sub_c``.
  """
  if masked:
    g_hbm, m_ref, x_ref, w_ref, o_ref, window, sem = refs
  else:
    (g_hbm, x_ref, w_ref, o_ref, window, sem), m_ref = refs, None
  gi, nb, rb, tb = (pl.program_id(0), pl.program_id(1), pl.program_id(3),
                    pl.program_id(4))
  g_rows, _, bt, bn = window.shape
  h0 = rb * rows_in
  # The first cotangent row read by input rows [h0, h0 + rows_in).
  first = lax.div(jnp.maximum(h0 + ph - (kh - 1) * dh, 0) + sh - 1, sh)
  start = jnp.minimum(first, oh_count - g_rows)
  copy = pltpu.make_async_copy(
      g_hbm.at[pl.ds(start, g_rows), :, gi, _block(g_hbm, 3, tb, bt),
               _block(g_hbm, 4, nb, bn)],
      window, sem)
  copy.start()

  @pl.when(tb == 0)
  def _init():
    o_ref[...] = jnp.zeros(o_ref.shape, _F32)

  copy.wait()

  def in_row(r, carry):
    h = h0 + r
    taps_ok, local, keeps = [], [], []
    for i in range(kh):
      ok, oh = _valid_index(h + ph - i * dh, sh, oh_count)
      taps_ok.append(ok)
      local.append(jnp.minimum(jnp.maximum(oh - start, 0), g_rows - 1))
      keeps.append(oh)

    def column(wi, carry):
      for i in range(kh):
        def tap(j, carry, i=i):
          col_ok, ow = _valid_index(wi + pw - j * dw, sw, ow_count)
          tap_index = i * kw + j

          @pl.when(taps_ok[i] & col_ok)
          def _add():
            def c_block(c0, carry):
              x = x_ref[r, wi, pl.ds(c0, sub_c), :].astype(_F32)  # (sub_c, bn)

              def chunk(off, size, acc):
                wc = w_ref[tap_index, pl.ds(c0, sub_c), pl.ds(off, size)]
                for r0 in range(0, size, 8):
                  g_rows8 = window[local[i], ow, pl.ds(off + r0, 8), :]
                  for q in range(8):
                    acc = acc + _conv_util.grad_term(
                        mode, wc[:, q + r0:q + r0 + 1] - x, g_rows8[q:q + 1, :])
                return acc
              part = _util.lane_chunks(bt, LANES, chunk,
                                       jnp.zeros(x.shape, _F32))
              if masked:
                # A select, not a product: a NaN of a masked lane is dropped.
                part = jnp.where(m_ref[keeps[i]] > 0, part, 0.0)
              o_ref[r, wi, pl.ds(c0, sub_c), :] = (
                  o_ref[r, wi, pl.ds(c0, sub_c), :] + part)
              return carry
            _sub_blocks(o_ref.shape[2], sub_c, c_block, 0)
          return carry
        if kw == 1:
          tap(0, 0)
        else:
          lax.fori_loop(0, kw, tap, 0)
      return carry

    return lax.fori_loop(0, w_count, column, carry)

  lax.fori_loop(0, rows_in, in_row, 0)


def _hwnc_input_grad_kernel(g_hbm, x_hbm, w_ref, o_ref, raw_g, raw_x, gwin,
                            xwin, acc, sem_g, sem_x, *, strips, rows, kh, kw,
                            sh, sw, dh, dw, ph, pw, h, oh_count, ow_count,
                            w_count, mode, sub_c):
  """One ``(c-block, row-block, t-block)`` step of the small-batch input
  gradient.

  ``g_hbm`` ``(OH, OW, N, T)`` float32 and ``x_hbm`` ``(H, W, N, C)`` are
  in HBM (channels on the lanes). Strip ``k`` is input rows ``[k*rows,
  (k+1)*rows)``; the step handles ``rows_in`` of them per strip. At the
  first ``T`` step it copies their activation rows into ``raw_x`` and
  transposes them into ``xwin`` ``(rows_in, W, bc, 128)`` (lanes: strip x
  image), kept over the ``T`` steps. Every step copies the cotangent rows
  they are read by into ``raw_g`` and transposes them into ``gwin``
  ``(g_rows, OW, bt, 128)``: since ``rows`` is a multiple of the stride,
  one local row index serves every strip, and a lane range marks the strips
  for which that cotangent row exists (a select, so a NaN elsewhere stays
  out). The last ``T`` step transposes the accumulator back into ``o_ref``
  ``(S, rows_in, W, N, bc)``.
  """
  rb, tb = pl.program_id(1), pl.program_id(2)
  rows_in, x_rows = acc.shape[0], raw_x.shape[1]
  g_rows, n, bt = raw_g.shape[1], raw_g.shape[3], raw_g.shape[4]
  win_rows = gwin.shape[0]
  bc = raw_x.shape[4]
  lanes = acc.shape[3]
  cb = pl.program_id(0)
  step = rows // sh                      # cotangent rows between strips
  h0 = rb * rows_in                      # first input row, strip 0
  # First cotangent row read by these rows (strip 0), ceil((h0 + ph -
  # (kh-1)*dh) / sh) computed on a non-negative numerator.
  off = sh * (-(-((kh - 1) * dh) // sh))
  base = lax.div(h0 + ph - (kh - 1) * dh + off + sh - 1, sh) - off // sh
  g_starts = [jnp.minimum(jnp.maximum(base + k * step, 0), oh_count - g_rows)
              for k in range(strips)]
  g_copies = _start_strip_copies(g_hbm, g_starts, g_rows,
                                 _block(g_hbm, 3, tb, bt), raw_g, sem_g)

  @pl.when(tb == 0)
  def _load_x():
    starts = [jnp.minimum(k * rows + h0, h - x_rows) for k in range(strips)]
    copies = _start_strip_copies(x_hbm, starts, x_rows,
                                 _block(x_hbm, 3, cb, bc), raw_x, sem_x)
    acc[...] = jnp.zeros(acc.shape, _F32)
    for copy in copies:
      copy.wait()
    # Rows past the image (last strip) read a clamped row; their results
    # are sliced off.
    locals_ = [k * rows + h0 - st for k, st in enumerate(starts)]

    def row(r, carry):
      def column(wi, carry):
        xwin[r, wi] = _strips_to_lanes(
            [raw_x[k, jnp.minimum(locals_[k] + r, x_rows - 1), wi]
             for k in range(strips)], lanes)
        return carry
      return lax.fori_loop(0, w_count, column, carry)
    lax.fori_loop(0, rows_in, row, 0)

  for copy in g_copies:
    copy.wait()

  def g_row(l, carry):
    local = [jnp.minimum(jnp.maximum(base + k * step + l - st, 0), g_rows - 1)
             for k, st in enumerate(g_starts)]

    def column(ow, carry):
      gwin[l, ow] = _strips_to_lanes(
          [raw_g[k, local[k], ow] for k in range(strips)], lanes)
      return carry
    return lax.fori_loop(0, ow_count, column, carry)

  lax.fori_loop(0, win_rows, g_row, 0)
  lane = lax.broadcasted_iota(jnp.int32, (1, lanes), 1)

  def in_row(r, carry):
    taps = []
    for i in range(kh):
      num = h0 + r + ph - i * dh + off
      oh0 = lax.div(num, sh) - off // sh         # cotangent row, strip 0
      ok = lax.rem(num, sh) == 0 if sh > 1 else num >= 0
      # Strips k with 0 <= oh0 + k*step < OH: a contiguous range.
      k_lo = lax.div(jnp.maximum(-oh0, 0) + step - 1, step)
      k_hi = jnp.where(oh0 > oh_count - 1, 0,
                       jnp.minimum(
                           lax.div(jnp.maximum(oh_count - 1 - oh0, 0), step)
                           + 1, strips))
      keep = (lane >= k_lo * n) & (lane < k_hi * n)
      taps.append((ok & (k_lo < k_hi), oh0 - base, keep))

    def column(wi, carry):
      for i in range(kh):
        tap_ok, local, keep = taps[i]

        def tap(j, carry, i=i, tap_ok=tap_ok, local=local, keep=keep):
          col_ok, ow = _valid_index(wi + pw - j * dw, sw, ow_count)
          tap_index = i * kw + j

          @pl.when(tap_ok & col_ok)
          def _add():
            def c_block(c0, carry):
              x = xwin[r, wi, pl.ds(c0, sub_c), :]           # (sub_c, 128)

              def chunk(off_t, size, a):
                wc = w_ref[tap_index, pl.ds(c0, sub_c), pl.ds(off_t, size)]
                for r0 in range(0, size, 8):
                  g8 = gwin[local, ow, pl.ds(off_t + r0, 8), :]
                  for q in range(8):
                    a = a + _conv_util.grad_term(
                        mode, wc[:, q + r0:q + r0 + 1] - x, g8[q:q + 1, :])
                return a
              part = _util.lane_chunks(bt, LANES, chunk,
                                       jnp.zeros(x.shape, _F32))
              # A select, not a product: a NaN of a dropped lane stays out.
              part = jnp.where(keep, part, 0.0)
              acc[r, wi, pl.ds(c0, sub_c), :] = (
                  acc[r, wi, pl.ds(c0, sub_c), :] + part)
              return carry
            _sub_blocks(bc, sub_c, c_block, 0)
          return carry
        if kw == 1:
          tap(0, 0)
        else:
          lax.fori_loop(0, kw, tap, 0)
      return carry
    return lax.fori_loop(0, w_count, column, carry)

  lax.fori_loop(0, rows_in, in_row, 0)

  @pl.when(tb == pl.num_programs(2) - 1)
  def _finish():
    def row(r, carry):
      def column(wi, carry):
        o_ref[:, r, wi] = _lanes_to_strips(acc[r, wi], strips, n)
        return carry
      return lax.fori_loop(0, w_count, column, carry)
    lax.fori_loop(0, rows_in, row, 0)


def _hwnc_input_grad(x, w, g, geo, cfg, strips, mode, *, interpret):
  """The small-batch input gradient on ``(H, W, N, C)`` / ``(OH, OW, N, T)``
  (see :func:`_hwnc_input_grad_kernel`); ``geo.groups == 1``, ``N`` a
  multiple of 8 and ``strips * N <= 128``. Returns ``(N, H, W, C)``."""
  s = geo.spec
  sh, sw = s.strides
  dh, dw = s.dilation
  ph, pw = s.padding[0][0], s.padding[1][0]
  c16 = _util.round_up(geo.c, SUBLANES)
  # The output block's lanes are input channels: all, or a multiple of 128.
  bc = min(c16, _util.round_up(cfg.block_c, LANES))
  c_pad = _util.round_up(geo.c, bc)
  t_pad, bt = padded_lane_axis(geo.t, 8, cfg.block_t)
  taps = geo.kh * geo.kw
  rows = sh * -(-geo.h // (sh * strips))         # input rows per strip
  strips = -(-geo.h // rows)
  rows_in = row_block(rows, cfg.block_r)
  win_rows = (rows_in - 1 + (geo.kh - 1) * dh) // sh + 1
  g_rows = min(win_rows, geo.oh)
  x_rows = min(rows_in, geo.h)
  xt = jnp.transpose(_util.pad_to(x, 3, c_pad), (1, 2, 0, 3))   # (H, W, N, C)
  gt = jnp.transpose(_util.pad_to(g.astype(_F32), 3, t_pad), (1, 2, 0, 3))
  wk = w.astype(_F32).reshape(taps, geo.c, geo.t)
  wk = jnp.pad(wk, ((0, 0), (0, c_pad - geo.c), (0, t_pad - geo.t)))
  grid = (c_pad // bc, rows // rows_in, t_pad // bt)
  kernel = functools.partial(
      _hwnc_input_grad_kernel, strips=strips, rows=rows, kh=geo.kh,
      kw=geo.kw, sh=sh, sw=sw, dh=dh, dw=dw, ph=ph, pw=pw, h=geo.h,
      oh_count=geo.oh, ow_count=geo.ow, w_count=geo.w, mode=mode,
      sub_c=_sub_block(bc, cfg.sub_c, SUBLANES))
  steps = grid[0] * grid[1] * grid[2]
  terms = LANES * t_pad * (rows // sh) * geo.ow * taps * c_pad
  dx = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((strips, rows, geo.w, geo.n, c_pad),
                                     _F32),
      grid=grid,
      in_specs=[
          pl.BlockSpec(memory_space=pl.ANY),
          pl.BlockSpec(memory_space=pl.ANY),
          pl.BlockSpec((taps, bc, bt), lambda cb, rb, tb: (0, cb, tb)),
      ],
      out_specs=pl.BlockSpec((strips, rows_in, geo.w, geo.n, bc),
                             lambda cb, rb, tb: (0, rb, 0, 0, cb)),
      scratch_shapes=[
          pltpu.VMEM((strips, g_rows, geo.ow, geo.n, bt), _F32),
          pltpu.VMEM((strips, x_rows, geo.w, geo.n, bc), xt.dtype),
          pltpu.VMEM((win_rows, geo.ow, bt, LANES), _F32),
          pltpu.VMEM((rows_in, geo.w, bc, LANES), _F32),
          pltpu.VMEM((rows_in, geo.w, bc, LANES), _F32),
          pltpu.SemaphoreType.DMA((strips,)),
          pltpu.SemaphoreType.DMA((strips,))],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'arbitrary'),
          vmem_limit_bytes=cfg.vmem_limit_bytes),
      cost_estimate=pl.CostEstimate(
          flops=5 * terms, transcendentals=0,
          bytes_accessed=(steps * strips * g_rows * geo.ow * geo.n * bt * 4 +
                          xt.size * xt.dtype.itemsize +
                          wk.size * 4 * (grid[1] if steps > 1 else 1) +
                          4 * strips * rows * geo.w * geo.n * c_pad)),
      interpret=interpret,
      name='adder_conv_input_grad_mosaic',
  )(gt, xt, wk)
  dx = dx.reshape((strips * rows,) + dx.shape[2:])[:geo.h, :, :, :geo.c]
  return jnp.transpose(dx, (2, 0, 1, 3))


@functools.partial(jax.jit, static_argnames=('spec', 'mode', 'interpret',
                                             'config', 'generation'))
def l1_conv_input_grad(x: jax.Array, w: jax.Array, g: jax.Array,
                       spec: ConvSpecLike, *, mode: str,
                       interpret: bool = False,
                       config: InputGradConfig | None = None,
                       generation: str | None = None) -> jax.Array:
  """Input gradient of the adder conv (paper eq. 6-7), without patches.

  ``dx[n, h, w, c] = sum g[n, oh, ow, t] * f(w[i, j, c, t] - x[n, h, w, c])``
  over the taps ``(i, j)`` and outputs ``(oh, ow)`` that read ``x[n, h, w, c]``
  and over ``t``; ``f`` is HardTanh (``'full_precision'``), ``sign``
  (``'sign'``) or the identity (``'unclipped'``). Positions read by no output
  get exactly 0.

  Args:
    x: ``(N, H, W, C)`` (or ``(N, W, C)``), float32 / bfloat16 / float16.
    w: ``(KH, KW, C // groups, T)``; read as float32.
    g: output cotangent ``(N, OH, OW, T)``; read as float32.
    spec: strides, padding, dilation and groups of the forward (a
      :class:`~pallas_kernels.conv_spec.ConvSpec` or a geometry with those
      attributes).
    mode: ``'full_precision'``, ``'sign'`` or ``'unclipped'``.
    interpret: run the kernel in the Pallas interpreter (any backend).
    config: block sizes; ``None`` uses
      :meth:`conv_tpu_config.InputGradConfig.get_default
      <pallas_kernels.conv_tpu_config.InputGradConfig.get_default>`.
    generation: TPU generation for the default config (``None``: v5e).

  Returns:
    ``(N, H, W, C)`` (or ``(N, W, C)``) float32.

  Raises:
    TypeError, ValueError: bad operands, spec or mode.
    NotImplementedError: 3-D convolutions.

  Examples:
    >>> import jax.numpy as jnp
    >>> from pallas_kernels import conv_tpu
    >>> from pallas_kernels.conv_spec import ConvSpec
    >>> x = jnp.array([[[0.0], [3.0], [1.0]]])        # N=1, W=3, C=1
    >>> w = jnp.full((1, 1, 1), 0.5)                  # 1x1, T=1
    >>> spec = ConvSpec(strides=(2,), padding=((0, 0),), dilation=(1,))
    >>> g = jnp.ones((1, 2, 1))
    >>> conv_tpu.l1_conv_input_grad(x, w, g, spec, mode='full_precision',
    ...                             interpret=True)[0, :, 0].tolist()
    [0.5, 0.0, -0.5]
  """
  _conv_util.check_mode(mode)
  x, w, g, geo, was_1d = _conv_util.check_conv_args(x, w, spec, g)
  s = geo.spec
  sh, sw = s.strides
  dh, dw = s.dilation
  ph, pw = s.padding[0][0], s.padding[1][0]
  cfg = config or InputGradConfig.get_default(
      n=geo.n, h=geo.h, w=geo.w, c=geo.c, t=geo.t, kh=geo.kh, kw=geo.kw,
      oh=geo.oh, ow=geo.ow, itemsize=x.dtype.itemsize, generation=generation,
      sh=sh, dh=dh, groups=geo.groups)
  bc = min(cfg.block_c, _util.round_up(geo.c, SUBLANES))
  c_pad = _util.round_up(geo.c, bc)
  t_pad, bt = padded_lane_axis(geo.t, 8, cfg.block_t)
  taps = geo.kh * geo.kw

  strips = _strip_count(geo.n, -(-geo.h // sh), cfg.block_n)
  if (strips > 1 and cfg.channels_on_lanes and
      reads_channels_on_lanes(geo.n, geo.groups)):
    dx = _hwnc_input_grad(x, w, g, geo, cfg, min(strips, LANES // geo.n),
                          mode, interpret=interpret)
    return dx[:, 0] if was_1d else dx
  if strips > 1:
    # A batch below one lane block: fold input-row strips into the lanes.
    # Strip k holds input rows [k*rows, (k+1)*rows) (rows a multiple of sh)
    # and cotangent rows [k*rows/sh - above, ...) with `above` rows of halo;
    # a per-lane mask marks the cotangent rows that are real outputs.
    rows = sh * -(-geo.h // (sh * strips))
    strips = -(-geo.h // rows)
    above = max(0, -(-((geo.kh - 1) * dh - ph) // sh))
    ph_k = ph + above * sh                   # padding as seen from a strip
    oh_k = (rows - 1 + ph_k) // sh + 1       # cotangent rows per strip
    xt = _to_hwgcn(x, geo.groups, c_pad)                    # (H, W, G, C, N)
    xt = _to_strips(xt, strips, rows, rows)
    gt = _to_hwgcn(g.astype(_F32), geo.groups, t_pad)       # (OH, OW, G, T, N)
    gt = jnp.pad(gt, ((above, 0),) + ((0, 0),) * 4)
    gt = _to_strips(gt, strips, rows // sh, oh_k)
    real = (jnp.arange(strips)[None, :] * (rows // sh) +
            jnp.arange(oh_k)[:, None])
    real = (real >= above) & (real < above + geo.oh)        # (oh_k, strips)
    mask = jnp.repeat(real.astype(_F32), geo.n, axis=1)[:, None, :]
  else:
    # The activation and cotangent as they are (batch-minor: free transposes
    # when the channels are aligned); padding is handled by the index maths.
    rows, ph_k, oh_k = geo.h, ph, geo.oh
    xt = _to_hwgcn(x, geo.groups, c_pad)                    # (H, W, G, C, N)
    gt = _to_hwgcn(g.astype(_F32), geo.groups, t_pad)       # (OH, OW, G, T, N)
    mask = None
  n_pad, bn = padded_batch(strips * geo.n, cfg.block_n)
  xt, gt = _pad_lanes(xt, n_pad), _pad_lanes(gt, n_pad)
  rows_in = row_block(rows, cfg.block_r)
  g_rows = min((rows_in - 1 + (geo.kh - 1) * dh) // sh + 1, oh_k)
  wk = w.astype(_F32).reshape(taps, geo.c, geo.groups, geo.t)
  wk = jnp.transpose(wk, (2, 0, 1, 3))                       # (G, taps, C, T)
  wk = jnp.pad(wk, ((0, 0), (0, 0), (0, c_pad - geo.c), (0, t_pad - geo.t)))

  grid = (geo.groups, n_pad // bn, c_pad // bc, rows // rows_in, t_pad // bt)
  row_map = lambda gi, nb, cb, rb, tb: (rb, 0, gi, cb, nb)
  in_specs = [pl.BlockSpec(memory_space=pl.ANY)]
  operands = [gt]
  if mask is not None:
    mask = _pad_lanes(mask, n_pad)
    in_specs.append(pl.BlockSpec((oh_k, 1, bn),
                                 lambda gi, nb, cb, rb, tb: (0, 0, nb)))
    operands.append(mask)
  in_specs += [
      pl.BlockSpec((rows_in, geo.w, None, bc, bn), row_map),
      pl.BlockSpec((None, taps, bc, bt),
                   lambda gi, nb, cb, rb, tb: (gi, 0, cb, tb)),
  ]
  operands += [xt, wk]
  kernel = functools.partial(
      _input_grad_kernel, kh=geo.kh, kw=geo.kw, sh=sh, sw=sw, dh=dh, dw=dw,
      ph=ph_k, pw=pw, oh_count=oh_k, ow_count=geo.ow, w_count=geo.w,
      rows_in=rows_in, mode=mode, sub_c=_sub_block(bc, cfg.sub_c, SUBLANES),
      masked=mask is not None)
  steps = grid[0] * grid[1] * grid[2] * grid[3] * grid[4]
  terms = geo.groups * n_pad * t_pad * oh_k * geo.ow * taps * c_pad
  dx = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(
          (rows, geo.w, geo.groups, c_pad, n_pad), _F32),
      grid=grid,
      in_specs=in_specs,
      out_specs=pl.BlockSpec((rows_in, geo.w, None, bc, bn), row_map),
      scratch_shapes=[pltpu.VMEM((g_rows, geo.ow, bt, bn), _F32),
                      pltpu.SemaphoreType.DMA(())],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel',
                               'parallel', 'arbitrary'),
          vmem_limit_bytes=cfg.vmem_limit_bytes),
      cost_estimate=pl.CostEstimate(
          flops=5 * terms, transcendentals=0,
          # One cotangent window copy per step; the activation rows stay put
          # over the T steps; the kernel block is fetched again only if
          # there are several C or T blocks.
          bytes_accessed=(steps * g_rows * geo.ow * bt * bn * 4 +
                          xt.size * xt.dtype.itemsize +
                          wk.size * 4 * (grid[1] * grid[3]
                                         if grid[2] * grid[4] > 1 else 1) +
                          4 * rows * geo.w * geo.groups * c_pad * n_pad)),
      interpret=interpret,
      name='adder_conv_input_grad_mosaic',
  )(*operands)
  dx = _from_strips(dx, strips, geo.n, geo.h, geo.c)
  return dx[:, 0] if was_1d else dx
