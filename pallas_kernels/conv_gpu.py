"""Patch-free adder (l1) convolution kernels for GPUs (Pallas, Triton).

No patch matrix: a program reads its input row segments straight from the
(padded, phase-split) activation in global memory -- they are served by L1 /
shared memory, each input element being reused ``KH * KW * T`` times by the
programs of one image -- and walks the kernel taps in registers (implicit
im2col).

Layout. Outside the kernel the activation is zero-padded once and split into
stride phases (space-to-depth): ``xpad[n, a*sh + r, b*sw + q, g, c]`` becomes
``xph[n, g, r, q, a, c, b]``, one copy of one activation. A tap ``(i, j)`` of
output ``(oh, ow)`` then reads phase ``((i*dh) % sh, (j*dw) % sw)`` at
``(oh + (i*dh)//sh, ow + (j*dw)//sw)``: a contiguous, stride-1 run of columns
whatever the conv stride, and the innermost (contiguous) axis is the column,
so a row segment is one coalesced load.

Forward: program ``(n, g, oh)`` x T-block x OW-block, accumulator
``(block_t, block_w)`` in registers; per input channel and tap it loads one
kernel column (``block_t``) and one input row segment (``block_w``) and does
``block_t * block_w`` l1 terms: ``(bt * bw) / (bt + bw)`` terms per loaded
value (21 at 32 x 64, 32 at 64 x 64), so the kernel is bound by the FP32
pipes -- 2 instructions per term, the absolute value being a free operand
modifier of FADD (docs/roofline.md: A100 9.7e12, H100 33.5e12 instructions/s,
i.e. 4.9 and 17 T terms/s) -- not by bandwidth.

Input gradient (gather form), one ``pallas_call`` per stride phase
``(r, q)`` with that phase's taps static: program ``(n, g, a)`` x C-block x
column block computes
``sum_t g[oh, ow, t] f(w[tap, c, t] - x)`` for the ``(block_c, block_w)``
input tile, and adds it under a mask that is true only where ``(oh, ow)`` is a
real output, so an input read by no output gets exactly 0 and a NaN in ``x``
or ``g`` reaches exactly the inputs that read it. The phases are interleaved
back and the padding cropped outside.

HBM temporaries: the phase-split activation, the padded cotangent and the
phase-major outputs (one activation each), against ``KH * KW`` activations
for a patch matrix.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _conv_util
from pallas_kernels import _util
from pallas_kernels.conv_gpu_config import ForwardConfig
from pallas_kernels.conv_gpu_config import InputGradConfig
from pallas_kernels.conv_spec import ConvSpecLike

_F32 = jnp.float32


def _cdiv(a, b):
  return -(-a // b)


def _phase_split(x, groups, spec, hq, wq, c_pad):
  """``(N, H, W, G*C)`` -> padded, phase-split ``(N, G, sh, sw, hq, C, wq)``."""
  n, h, w, _ = x.shape
  (ph0, _), (pw0, _) = spec.padding
  sh, sw = spec.strides
  x = x.reshape(n, h, w, groups, -1)
  c = x.shape[-1]
  x = jnp.pad(x, ((0, 0), (ph0, hq * sh - h - ph0), (pw0, wq * sw - w - pw0),
                  (0, 0), (0, c_pad - c)))
  x = x.reshape(n, hq, sh, wq, sw, groups, c_pad)
  return jnp.transpose(x, (0, 5, 2, 4, 1, 6, 3))


def _triton_params(cfg):
  return plgpu.CompilerParams(num_warps=cfg.num_warps,
                              num_stages=cfg.num_stages)


# --- forward ----------------------------------------------------------------


def _forward_kernel(x_ref, w_ref, o_ref, *, taps, c_count, oh_count):
  """One ``(n*g*oh, t-block, ow-block)`` program.

  Refs: ``x_ref`` ``(sh, sw, hq, C, wq)`` (one image and group), ``w_ref``
  ``(KH*KW, bt, C)`` float32, ``o_ref`` ``(bt, bw)`` float32.
  ``taps``: static ``(tap_index, r, q, row_offset, col_offset)``.
  """
  bt, bw = o_ref.shape
  oh = lax.rem(pl.program_id(0), oh_count)
  b0 = pl.program_id(2) * bw

  def channel(c, acc):
    for k, r, q, a_off, b_off in taps:
      x_row = x_ref[r, q, oh + a_off, pl.ds(c, 1),
                    pl.ds(b0 + b_off, bw)].astype(_F32)       # (1, bw)
      w_col = w_ref[k, :, pl.ds(c, 1)]                        # (bt, 1)
      acc = acc + jnp.abs(w_col - x_row)
    return acc

  acc = lax.fori_loop(0, c_count, channel, jnp.zeros((bt, bw), _F32))
  o_ref[...] = 0.0 - acc


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
      :meth:`conv_gpu_config.ForwardConfig.get_default
      <pallas_kernels.conv_gpu_config.ForwardConfig.get_default>`.
    generation: GPU generation for the default config (``'a100'``,
      ``'h100'``; ``None``: A100).

  Returns:
    ``(N, OH, OW, T)`` (or ``(N, OW, T)``) float32.

  Raises:
    TypeError, ValueError: bad operands or spec (the message names them).
    NotImplementedError: 3-D convolutions.

  Examples:
    >>> import jax.numpy as jnp
    >>> from pallas_kernels import conv_gpu
    >>> from pallas_kernels.conv_spec import ConvSpec
    >>> x = jnp.arange(4.0).reshape(1, 4, 1)          # N=1, W=4, C=1
    >>> w = jnp.ones((2, 1, 1))                       # KW=2, T=1
    >>> spec = ConvSpec(strides=(1,), padding=((0, 1),), dilation=(1,))
    >>> conv_gpu.l1_conv_forward(x, w, spec, interpret=True)[0, :, 0].tolist()
    [-1.0, -1.0, -3.0, -3.0]
  """
  x, w, _, geo, was_1d = _conv_util.check_conv_args(x, w, spec)
  s = geo.spec
  cfg = config or ForwardConfig.get_default(t=geo.t, ow=geo.ow,
                                            generation=generation)
  sh, sw = s.strides
  dh, dw = s.dilation
  (ph0, ph1), (pw0, pw1) = s.padding
  bt, bw = cfg.block_t, cfg.block_w
  t_pad = _util.round_up(geo.t, bt)
  ow_pad = _util.round_up(geo.ow, bw)
  hq = max(_cdiv(geo.h + ph0 + ph1, sh), geo.oh + (geo.kh - 1) * dh // sh)
  wq = max(_cdiv(geo.w + pw0 + pw1, sw), ow_pad + (geo.kw - 1) * dw // sw)
  taps = tuple((i * geo.kw + j, (i * dh) % sh, (j * dw) % sw, (i * dh) // sh,
                (j * dw) // sw) for i in range(geo.kh) for j in range(geo.kw))

  xph = _phase_split(x, geo.groups, s, hq, wq, geo.c)
  wt = w.astype(_F32).reshape(geo.kh * geo.kw, geo.c, geo.groups, geo.t)
  wt = jnp.transpose(wt, (2, 0, 3, 1))                        # (G, taps, T, C)
  wt = jnp.pad(wt, ((0, 0), (0, 0), (0, t_pad - geo.t), (0, 0)))

  groups, oh_count = geo.groups, geo.oh

  def image(p):
    return lax.div(p, groups * oh_count)

  def group(p):
    return lax.rem(lax.div(p, oh_count), groups)

  grid = (geo.n * groups * oh_count, t_pad // bt, ow_pad // bw)
  kernel = functools.partial(_forward_kernel, taps=taps, c_count=geo.c,
                             oh_count=oh_count)
  terms = geo.n * geo.oh * ow_pad * groups * t_pad * geo.kh * geo.kw * geo.c
  y = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((geo.n, groups, geo.oh, t_pad, ow_pad),
                                     _F32),
      grid=grid,
      in_specs=[
          pl.BlockSpec((None, None, sh, sw, hq, geo.c, wq),
                       lambda p, tb, ob: (image(p), group(p), 0, 0, 0, 0, 0)),
          pl.BlockSpec((None, geo.kh * geo.kw, bt, geo.c),
                       lambda p, tb, ob: (group(p), 0, tb, 0)),
      ],
      out_specs=pl.BlockSpec(
          (None, None, None, bt, bw),
          lambda p, tb, ob: (image(p), group(p), lax.rem(p, oh_count), tb,
                             ob)),
      compiler_params=_triton_params(cfg),
      cost_estimate=pl.CostEstimate(
          flops=3 * terms, transcendentals=0,
          bytes_accessed=(xph.size * xph.dtype.itemsize +
                          wt.size * 4 * grid[0] // groups +
                          4 * geo.n * groups * geo.oh * t_pad * ow_pad)),
      interpret=interpret,
      name='adder_conv_forward_triton',
  )(xph, wt)
  y = y[:, :, :, :geo.t, :geo.ow]                   # (N, G, OH, T, OW)
  y = jnp.transpose(y, (0, 2, 4, 1, 3)).reshape(geo.n, geo.oh, geo.ow,
                                                groups * geo.t)
  return y[:, 0] if was_1d else y


# --- input gradient ----------------------------------------------------------


def _input_grad_kernel(x_ref, w_ref, g_ref, o_ref, *, taps, t_count, hq,
                       oh_count, ow_count, col_pad, mode):
  """One ``(n*g*a, c-block, column-block)`` program of one stride phase.

  Refs: ``x_ref`` ``(bc, bw)`` input tile of the phase grid, ``w_ref``
  ``(KH*KW, bc, T)`` float32, ``g_ref`` ``(OH, T, col_pad + wg)`` float32
  (columns shifted right by ``col_pad``), ``o_ref`` ``(bc, bw)`` float32.
  ``taps``: static ``(tap_index, row_offset, col_offset)`` of this phase.
  """
  bc, bw = o_ref.shape
  a = lax.rem(pl.program_id(0), hq)
  b0 = pl.program_id(2) * bw
  x = x_ref[...].astype(_F32)
  cols = b0 + lax.broadcasted_iota(jnp.int32, (1, bw), 1)
  acc = jnp.zeros((bc, bw), _F32)
  for k, a_off, b_off in taps:
    oh = a - a_off
    row_ok = (oh >= 0) & (oh < oh_count)
    oh = jnp.minimum(jnp.maximum(oh, 0), oh_count - 1)
    start = b0 - b_off + col_pad

    def out_channel(t, part, k=k, oh=oh, start=start):
      g_row = g_ref[oh, pl.ds(t, 1), pl.ds(start, bw)]        # (1, bw)
      w_col = w_ref[k, :, pl.ds(t, 1)]                        # (bc, 1)
      return part + _conv_util.grad_term(mode, w_col - x, g_row)

    part = lax.fori_loop(0, t_count, out_channel, jnp.zeros((bc, bw), _F32))
    ok = row_ok & (cols - b_off >= 0) & (cols - b_off < ow_count)
    acc = acc + jnp.where(ok, part, 0.0)
  o_ref[...] = acc


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
      :meth:`conv_gpu_config.InputGradConfig.get_default
      <pallas_kernels.conv_gpu_config.InputGradConfig.get_default>`.
    generation: GPU generation for the default config (``None``: A100).

  Returns:
    ``(N, H, W, C)`` (or ``(N, W, C)``) float32.

  Raises:
    TypeError, ValueError: bad operands, spec or mode.
    NotImplementedError: 3-D convolutions.

  Examples:
    >>> import jax.numpy as jnp
    >>> from pallas_kernels import conv_gpu
    >>> from pallas_kernels.conv_spec import ConvSpec
    >>> x = jnp.array([[[0.0], [3.0], [1.0]]])        # N=1, W=3, C=1
    >>> w = jnp.full((1, 1, 1), 0.5)                  # 1x1, T=1
    >>> spec = ConvSpec(strides=(2,), padding=((0, 0),), dilation=(1,))
    >>> g = jnp.ones((1, 2, 1))
    >>> conv_gpu.l1_conv_input_grad(x, w, g, spec, mode='full_precision',
    ...                             interpret=True)[0, :, 0].tolist()
    [0.5, 0.0, -0.5]
  """
  _conv_util.check_mode(mode)
  x, w, g, geo, was_1d = _conv_util.check_conv_args(x, w, spec, g)
  s = geo.spec
  sh, sw = s.strides
  dh, dw = s.dilation
  (ph0, ph1), (pw0, pw1) = s.padding
  hq = _cdiv(geo.h + ph0 + ph1, sh)
  wq0 = _cdiv(geo.w + pw0 + pw1, sw)
  cfg = config or InputGradConfig.get_default(c=geo.c, w=wq0,
                                              generation=generation)
  bc, bw = cfg.block_c, cfg.block_w
  c_pad = _util.round_up(geo.c, bc)
  wq = _util.round_up(wq0, bw)
  col_pad = (geo.kw - 1) * dw // sw
  groups = geo.groups

  # (N, G, sh, sw, hq, C, wq)
  xph = _phase_split(x, groups, s, hq, wq, c_pad)
  wk = w.astype(_F32).reshape(geo.kh * geo.kw, geo.c, groups, geo.t)
  wk = jnp.transpose(wk, (2, 0, 1, 3))                 # (G, taps, C, T)
  wk = jnp.pad(wk, ((0, 0), (0, 0), (0, c_pad - geo.c), (0, 0)))
  gk = g.astype(_F32).reshape(geo.n, geo.oh, geo.ow, groups, geo.t)
  gk = jnp.transpose(gk, (0, 3, 1, 4, 2))              # (N, G, OH, T, OW)
  gk = jnp.pad(gk, ((0, 0),) * 4 + ((col_pad, wq - geo.ow),))

  def image(p):
    return lax.div(p, groups * hq)

  def group(p):
    return lax.rem(lax.div(p, hq), groups)

  grid = (geo.n * groups * hq, c_pad // bc, wq // bw)
  phases = []
  for r in range(sh):
    for q in range(sw):
      taps = tuple((i * geo.kw + j, (i * dh) // sh, (j * dw) // sw)
                   for i in range(geo.kh) for j in range(geo.kw)
                   if (i * dh) % sh == r and (j * dw) % sw == q)
      if not taps:
        phases.append(jnp.zeros((geo.n, groups, hq, c_pad, wq), _F32))
        continue
      kernel = functools.partial(
          _input_grad_kernel, taps=taps, t_count=geo.t, hq=hq,
          oh_count=geo.oh, ow_count=geo.ow, col_pad=col_pad, mode=mode)
      terms = geo.n * groups * hq * c_pad * wq * len(taps) * geo.t
      phases.append(pl.pallas_call(
          kernel,
          out_shape=jax.ShapeDtypeStruct((geo.n, groups, hq, c_pad, wq), _F32),
          grid=grid,
          in_specs=[
              pl.BlockSpec((None, None, None, None, None, bc, bw),
                           lambda p, cb, wb, r=r, q=q: (
                               image(p), group(p), r, q, lax.rem(p, hq), cb,
                               wb)),
              pl.BlockSpec((None, geo.kh * geo.kw, bc, geo.t),
                           lambda p, cb, wb: (group(p), 0, cb, 0)),
              pl.BlockSpec((None, None, geo.oh, geo.t, gk.shape[-1]),
                           lambda p, cb, wb: (image(p), group(p), 0, 0, 0)),
          ],
          out_specs=pl.BlockSpec(
              (None, None, None, bc, bw),
              lambda p, cb, wb: (image(p), group(p), lax.rem(p, hq), cb, wb)),
          compiler_params=_triton_params(cfg),
          cost_estimate=pl.CostEstimate(
              flops=5 * terms, transcendentals=0,
              bytes_accessed=(xph.size * xph.dtype.itemsize // (sh * sw) +
                              gk.size * 4 * len(taps) +
                              4 * geo.n * groups * hq * c_pad * wq)),
          interpret=interpret,
          name='adder_conv_input_grad_triton',
      )(xph, wk, gk))
  dx = jnp.stack(phases).reshape(sh, sw, geo.n, groups, hq, c_pad, wq)
  # (N, hq, sh, wq, sw, G, C)
  dx = jnp.transpose(dx, (2, 4, 0, 6, 1, 3, 5))
  dx = dx.reshape(geo.n, hq * sh, wq * sw, groups, c_pad)
  dx = dx[:, ph0:ph0 + geo.h, pw0:pw0 + geo.w, :, :geo.c]
  dx = dx.reshape(geo.n, geo.h, geo.w, groups * geo.c)
  return dx[:, 0] if was_1d else dx
