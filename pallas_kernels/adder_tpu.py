"""Adder (l1) kernels for TPUs, written in Pallas (Mosaic).

Same contract as :mod:`pallas_kernels.adder_gpu`: canonical patch layout
(``P[G, K, M]``, ``W[G, K, T]``, ``Y[G, T, M]``), zero padding to block
multiples outside the kernel, float32 accumulation, ``interpret`` passed to
every ``pallas_call``.

TPU specifics:

* ``M`` is the lane axis of every block, so each vector op works on
  8 x 128 output elements; the accumulator lives in vector registers for a
  whole 128-wide chunk of the reduction and in the resident output block
  between grid steps (the reduction grid axis is innermost and
  ``'arbitrary'``).
* The broadcast operand of each step is a *column* of the kernel block, taken
  at a static lane index of a 128-lane chunk (dynamic lane offsets must be
  multiples of 128), so the reduction axis is the lane axis of that block and
  is padded to a multiple of 128 or kept whole (see
  :mod:`pallas_kernels.adder_tpu_config`).
* The forward pass sums ``|p - w|`` directly (3 VPU ops per term: sub,
  abs, add). The identity ``|a - b| = 2 max(a, b) - a - b`` would save one,
  but it cancels for inputs far from zero (see ``adderjax.ops.xla_backend``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _util
from pallas_kernels.adder_tpu_config import ForwardConfig
from pallas_kernels.adder_tpu_config import InputGradConfig
from pallas_kernels.adder_tpu_config import LANES
from pallas_kernels.adder_tpu_config import SUBLANES

_F32 = jnp.float32
_SEMANTICS = ('parallel', 'parallel', 'parallel', 'arbitrary')


def _forward_kernel(p_ref, wt_ref, o_ref):
  """One ``(g, t-block, m-block, k-block)`` step.

  Refs: ``p_ref`` ``(bk, bm)``, ``wt_ref`` ``(bt, bk)``, ``o_ref`` ``(bt, bm)``
  float32, which holds ``sum_k |p - w|`` until the last ``k`` step negates
  it. The terms are computed directly (no ``max`` identity, which cancels
  for inputs far from zero).
  """
  k_step = pl.program_id(3)

  @pl.when(k_step == 0)
  def _init():
    o_ref[...] = jnp.zeros(o_ref.shape, _F32)

  def chunk(off, size, acc):
    wt = wt_ref[:, pl.ds(off, size)].astype(_F32)            # (bt, size)
    # Rows are read in sublane-aligned groups (16 rows is one packed bf16
    # tile) and split statically: a dynamic single-row load of a packed dtype
    # cannot be proven aligned.
    for j0 in range(0, size, SUBLANES):
      rows = p_ref[pl.ds(off + j0, SUBLANES), :].astype(_F32)  # (16, bm)
      for r in range(SUBLANES):
        j = j0 + r
        acc = acc + jnp.abs(wt[:, j:j + 1] - rows[r:r + 1, :])
    return acc

  acc = _util.lane_chunks(wt_ref.shape[1], LANES, chunk, o_ref[...])
  is_last = k_step == pl.num_programs(3) - 1
  o_ref[...] = jnp.where(is_last, -acc, acc)


def _input_grad_term(mode: str, d, g_row):
  """``g * h(d)`` for one output channel, ``d = w - p``."""
  if mode == 'sign':  # d * 0: zero, or NaN for a NaN d.
    return jnp.where(d > 0, g_row, jnp.where(d < 0, -g_row, d * g_row))
  return g_row * _util.hardtanh_like(mode, d)


def _input_grad_kernel(p_ref, w_ref, g_ref, o_ref, *, mode: str):
  """One ``(g, k-block, m-block, t-block)`` step.

  Refs: ``p_ref`` ``(bk, bm)``, ``w_ref`` ``(bk, bt)``, ``g_ref`` ``(bt, bm)``,
  ``o_ref`` ``(bk, bm)`` float32 (accumulated over the ``t`` steps).
  """
  @pl.when(pl.program_id(3) == 0)
  def _init():
    o_ref[...] = jnp.zeros(o_ref.shape, _F32)

  p = p_ref[...].astype(_F32)

  def chunk(off, size, acc):
    w = w_ref[:, pl.ds(off, size)].astype(_F32)               # (bk, size)
    for j in range(size):
      g_row = g_ref[pl.ds(off + j, 1), :].astype(_F32)        # (1, bm)
      acc = acc + _input_grad_term(mode, w[:, j:j + 1] - p, g_row)
    return acc

  o_ref[...] = _util.lane_chunks(w_ref.shape[1], LANES, chunk, o_ref[...])


@functools.partial(jax.jit, static_argnames=('config', 'interpret'))
def l1_forward(p: jax.Array, w: jax.Array, *,
               config: ForwardConfig | None = None,
               interpret: bool = False) -> jax.Array:
  """``Y[g, t, m] = -sum_k |P[g, k, m] - W[g, k, t]|`` with a Mosaic kernel.

  Args:
    p: patches ``[G, K, M]``, any float dtype (read as is, upcast in-kernel).
    w: kernel ``[G, K, T]`` (read as float32: it is small).
    config: block sizes; ``None`` uses
      :meth:`adder_tpu_config.ForwardConfig.get_default
      <pallas_kernels.adder_tpu_config.ForwardConfig.get_default>`.
    interpret: run the kernel in the Pallas interpreter (any backend).

  Returns:
    ``[G, T, M]`` float32.

  Raises:
    ValueError: shapes that are not the canonical layout.

  Examples:
    >>> import jax.numpy as jnp
    >>> from pallas_kernels import adder_tpu
    >>> p = jnp.array([[[0., 1., 2.], [3., 4., 5.]]])  # K=2 taps, M=3
    >>> w = jnp.ones((1, 2, 1))                        # T=1 filter of ones
    >>> adder_tpu.l1_forward(p, w, interpret=True).tolist()
    [[[-3.0, -3.0, -5.0]]]
  """
  g, k, m, t = _util.check_layout(p, w)
  cfg = config or ForwardConfig.get_default(k=k, m=m, t=t)
  k_pad = cfg.padded_k(k)
  block_k = min(k_pad, cfg.block_k)
  m_pad = _util.round_up(m, cfg.block_m)
  t_pad = _util.round_up(t, cfg.block_t)
  p = _util.pad_to(_util.pad_to(p, 1, k_pad), 2, m_pad)
  wt = jnp.swapaxes(
      _util.pad_to(_util.pad_to(w.astype(_F32), 1, k_pad), 2, t_pad), 1, 2)
  grid = (g, t_pad // cfg.block_t, m_pad // cfg.block_m, k_pad // block_k)
  y = pl.pallas_call(
      _forward_kernel,
      out_shape=jax.ShapeDtypeStruct((g, t_pad, m_pad), _F32),
      grid=grid,
      in_specs=[
          pl.BlockSpec((None, block_k, cfg.block_m),
                       lambda gi, ti, mi, ki: (gi, ki, mi)),
          pl.BlockSpec((None, cfg.block_t, block_k),
                       lambda gi, ti, mi, ki: (gi, ti, ki)),
      ],
      out_specs=pl.BlockSpec((None, cfg.block_t, cfg.block_m),
                             lambda gi, ti, mi, ki: (gi, ti, mi)),
      compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
      cost_estimate=pl.CostEstimate(
          flops=2 * g * k_pad * m_pad * t_pad, transcendentals=0,
          bytes_accessed=(p.size * p.dtype.itemsize * grid[1] +
                          wt.size * 4 * grid[2] + 4 * g * t_pad * m_pad)),
      interpret=interpret,
      name='adder_l1_forward_mosaic',
  )(p, wt)
  return y[:, :t, :m]


@functools.partial(jax.jit, static_argnames=('mode', 'config', 'interpret'))
def l1_input_grad(p: jax.Array, w: jax.Array, gy: jax.Array,
                  mode: str = 'full_precision', *,
                  config: InputGradConfig | None = None,
                  interpret: bool = False) -> jax.Array:
  """``dP[g, k, m] = sum_t gy[g, t, m] h(W[g, k, t] - P[g, k, m])`` (Mosaic).

  ``h`` is HardTanh for ``'full_precision'`` (paper eq. 6-7), ``sign`` for
  ``'sign'`` and the identity for ``'unclipped'``.

  Args:
    p: patches ``[G, K, M]``.
    w: kernel ``[G, K, T]`` (read as float32).
    gy: output cotangent ``[G, T, M]`` (read as float32).
    mode: ``'full_precision'``, ``'sign'`` or ``'unclipped'``.
    config: block sizes; ``None`` uses
      :meth:`adder_tpu_config.InputGradConfig.get_default
      <pallas_kernels.adder_tpu_config.InputGradConfig.get_default>`.
    interpret: run the kernel in the Pallas interpreter (any backend).

  Returns:
    ``[G, K, M]`` float32.

  Raises:
    ValueError: shapes that are not the canonical layout, or an unknown mode.

  Examples:
    >>> import jax.numpy as jnp
    >>> from pallas_kernels import adder_tpu
    >>> p = jnp.array([[[0.0, 3.0]]])   # G=1, K=1, M=2
    >>> w = jnp.array([[[0.5, 1.0]]])   # T=2
    >>> g = jnp.ones((1, 2, 2))
    >>> adder_tpu.l1_input_grad(p, w, g, interpret=True).tolist()
    [[[1.5, -2.0]]]
  """
  _util.check_mode(mode)
  g, k, m, t = _util.check_layout(p, w, gy)
  cfg = config or InputGradConfig.get_default(k=k, m=m, t=t)
  k_pad = _util.round_up(k, cfg.block_k)
  m_pad = _util.round_up(m, cfg.block_m)
  t_pad = cfg.padded_t(t)
  block_t = min(t_pad, cfg.block_t)
  p = _util.pad_to(_util.pad_to(p, 1, k_pad), 2, m_pad)
  w = _util.pad_to(_util.pad_to(w.astype(_F32), 1, k_pad), 2, t_pad)
  gy = _util.pad_to(_util.pad_to(gy.astype(_F32), 1, t_pad), 2, m_pad)
  grid = (g, k_pad // cfg.block_k, m_pad // cfg.block_m, t_pad // block_t)
  dp = pl.pallas_call(
      functools.partial(_input_grad_kernel, mode=mode),
      out_shape=jax.ShapeDtypeStruct((g, k_pad, m_pad), _F32),
      grid=grid,
      in_specs=[
          pl.BlockSpec((None, cfg.block_k, cfg.block_m),
                       lambda gi, ki, mi, ti: (gi, ki, mi)),
          pl.BlockSpec((None, cfg.block_k, block_t),
                       lambda gi, ki, mi, ti: (gi, ki, ti)),
          pl.BlockSpec((None, block_t, cfg.block_m),
                       lambda gi, ki, mi, ti: (gi, ti, mi)),
      ],
      out_specs=pl.BlockSpec((None, cfg.block_k, cfg.block_m),
                             lambda gi, ki, mi, ti: (gi, ki, mi)),
      compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
      cost_estimate=pl.CostEstimate(
          flops=5 * g * k_pad * m_pad * t_pad, transcendentals=0,
          bytes_accessed=(p.size * p.dtype.itemsize +
                          gy.size * 4 * grid[1] + w.size * 4 * grid[2] +
                          4 * g * k_pad * m_pad)),
      interpret=interpret,
      name='adder_l1_input_grad_mosaic',
  )(p, w, gy)
  return dp[:, :k, :m]
