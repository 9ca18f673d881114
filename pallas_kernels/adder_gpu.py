"""Adder (l1) kernels for GPUs, written in Pallas with Triton compiler params.

Both kernels work on the canonical patch layout of
:mod:`adderjax.ops.geometry`: patches ``P[G, K, M]``, kernel ``W[G, K, T]``,
output (and its cotangent) ``[G, T, M]``. Shapes are zero-padded to block
multiples outside the kernel and the result is sliced back, so the kernels
need no masks:

* padding ``K`` in both ``P`` and ``W`` adds ``|0 - 0| = 0`` to every distance;
* padding ``T`` in ``W`` and in the cotangent adds ``0 * h(.) = 0`` to ``dP``;
* padded ``M`` columns and ``T`` rows of the output are sliced off.

In jax 0.10.2 Pallas' default GPU lowering is Mosaic GPU, which does not take
these kernels; passing ``jax.experimental.pallas.triton.CompilerParams``
selects the Triton lowering. Triton needs power-of-two tile shapes and slices
refs (not loaded values), so the reduction loops read one row of each operand
per step straight from the refs.

Every function takes ``interpret``: with ``interpret=True`` the same kernel
runs on any backend (CPU included) through the Pallas interpreter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _util
from pallas_kernels.adder_gpu_config import ForwardConfig
from pallas_kernels.adder_gpu_config import InputGradConfig

_F32 = jnp.float32


def _forward_kernel(p_ref, wt_ref, o_ref, *, block_k: int, n_chunks: int):
  """One ``(g, m-block, t-block)`` program: ``o = -sum_k |w_k - p_k|``.

  Refs: ``p_ref`` ``(K_pad, bm)``, ``wt_ref`` ``(bt, K_pad)`` (the kernel
  transposed so a ``k`` column is a ``(bt, 1)`` slice), ``o_ref`` ``(bt, bm)``.
  """
  bt, bm = o_ref.shape

  def chunk(c, acc):
    k0 = c * block_k
    for j in range(block_k):
      p_row = p_ref[pl.ds(k0 + j, 1), :].astype(_F32)   # (1, bm)
      w_col = wt_ref[:, pl.ds(k0 + j, 1)].astype(_F32)  # (bt, 1)
      acc = acc + jnp.abs(w_col - p_row)
    return acc

  acc = lax.fori_loop(0, n_chunks, chunk, jnp.zeros((bt, bm), _F32))
  o_ref[...] = -acc


def _input_grad_kernel(p_ref, w_ref, g_ref, o_ref, *, mode: str,
                       block_t: int, n_chunks: int):
  """One ``(g, k-block, m-block)`` program: ``o = sum_t g_t h(w_t - p)``.

  Refs: ``p_ref`` ``(bk, bm)``, ``w_ref`` ``(bk, T_pad)``, ``g_ref``
  ``(T_pad, bm)``, ``o_ref`` ``(bk, bm)`` float32.
  """
  p = p_ref[...].astype(_F32)

  def chunk(c, acc):
    t0 = c * block_t
    for j in range(block_t):
      g_row = g_ref[pl.ds(t0 + j, 1), :].astype(_F32)  # (1, bm)
      w_col = w_ref[:, pl.ds(t0 + j, 1)].astype(_F32)  # (bk, 1)
      acc = acc + g_row * _util.hardtanh_like(mode, w_col - p)
    return acc

  o_ref[...] = lax.fori_loop(0, n_chunks, chunk, jnp.zeros(p.shape, _F32))


@functools.partial(jax.jit, static_argnames=('config', 'interpret'))
def l1_forward(p: jax.Array, w: jax.Array, *,
               config: ForwardConfig | None = None,
               interpret: bool = False) -> jax.Array:
  """``Y[g, t, m] = -sum_k |P[g, k, m] - W[g, k, t]|`` with a Triton kernel.

  Args:
    p: patches ``[G, K, M]``, any float dtype (read as is, upcast in-kernel).
    w: kernel ``[G, K, T]``.
    config: block sizes; ``None`` uses
      :meth:`adder_gpu_config.ForwardConfig.get_default
      <pallas_kernels.adder_gpu_config.ForwardConfig.get_default>`.
    interpret: run the kernel in the Pallas interpreter (any backend).

  Returns:
    ``[G, T, M]`` float32.

  Raises:
    ValueError: shapes that are not the canonical layout.

  Examples:
    >>> import jax.numpy as jnp
    >>> from pallas_kernels import adder_gpu
    >>> p = jnp.array([[[0., 1., 2.], [3., 4., 5.]]])  # K=2 taps, M=3
    >>> w = jnp.ones((1, 2, 1))                        # T=1 filter of ones
    >>> adder_gpu.l1_forward(p, w, interpret=True).tolist()
    [[[-3.0, -3.0, -5.0]]]
  """
  g, k, m, t = _util.check_layout(p, w)
  cfg = config or ForwardConfig.get_default(k=k, m=m, t=t)
  k_pad = _util.round_up(k, cfg.block_k)
  m_pad = _util.round_up(m, cfg.block_m)
  t_pad = _util.round_up(t, cfg.block_t)
  p = _util.pad_to(_util.pad_to(p, 1, k_pad), 2, m_pad)
  wt = jnp.swapaxes(_util.pad_to(_util.pad_to(w, 1, k_pad), 2, t_pad), 1, 2)
  grid = (g, m_pad // cfg.block_m, t_pad // cfg.block_t)
  kernel = functools.partial(_forward_kernel, block_k=cfg.block_k,
                             n_chunks=k_pad // cfg.block_k)
  y = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((g, t_pad, m_pad), _F32),
      grid=grid,
      in_specs=[
          pl.BlockSpec((None, k_pad, cfg.block_m), lambda gi, i, j: (gi, 0, i)),
          pl.BlockSpec((None, cfg.block_t, k_pad), lambda gi, i, j: (gi, j, 0)),
      ],
      out_specs=pl.BlockSpec((None, cfg.block_t, cfg.block_m),
                             lambda gi, i, j: (gi, j, i)),
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps,
                                           num_stages=cfg.num_stages),
      cost_estimate=pl.CostEstimate(
          flops=3 * g * k_pad * m_pad * t_pad, transcendentals=0,
          bytes_accessed=(p.size * p.dtype.itemsize * grid[2] +
                          wt.size * wt.dtype.itemsize * grid[1] +
                          4 * g * t_pad * m_pad)),
      interpret=interpret,
      name='adder_l1_forward_triton',
  )(p, wt)
  return y[:, :t, :m]


@functools.partial(jax.jit, static_argnames=('mode', 'config', 'interpret'))
def l1_input_grad(p: jax.Array, w: jax.Array, gy: jax.Array,
                  mode: str = 'full_precision', *,
                  config: InputGradConfig | None = None,
                  interpret: bool = False) -> jax.Array:
  """``dP[g, k, m] = sum_t gy[g, t, m] h(W[g, k, t] - P[g, k, m])`` (Triton).

  ``h`` is HardTanh for ``'full_precision'`` (paper eq. 6-7), ``sign`` for
  ``'sign'`` and the identity for ``'unclipped'``.

  Args:
    p: patches ``[G, K, M]``.
    w: kernel ``[G, K, T]``.
    gy: output cotangent ``[G, T, M]``.
    mode: ``'full_precision'``, ``'sign'`` or ``'unclipped'``.
    config: block sizes; ``None`` uses
      :meth:`adder_gpu_config.InputGradConfig.get_default
      <pallas_kernels.adder_gpu_config.InputGradConfig.get_default>`.
    interpret: run the kernel in the Pallas interpreter (any backend).

  Returns:
    ``[G, K, M]`` float32.

  Raises:
    ValueError: shapes that are not the canonical layout, or an unknown mode.

  Examples:
    >>> import jax.numpy as jnp
    >>> from pallas_kernels import adder_gpu
    >>> p = jnp.array([[[0.0, 3.0]]])   # G=1, K=1, M=2
    >>> w = jnp.array([[[0.5, 1.0]]])   # T=2
    >>> g = jnp.ones((1, 2, 2))
    >>> adder_gpu.l1_input_grad(p, w, g, interpret=True).tolist()
    [[[1.5, -2.0]]]
  """
  _util.check_mode(mode)
  g, k, m, t = _util.check_layout(p, w, gy)
  cfg = config or InputGradConfig.get_default(k=k, m=m, t=t)
  k_pad = _util.round_up(k, cfg.block_k)
  m_pad = _util.round_up(m, cfg.block_m)
  t_pad = _util.round_up(t, cfg.block_t)
  p = _util.pad_to(_util.pad_to(p, 1, k_pad), 2, m_pad)
  w = _util.pad_to(_util.pad_to(w, 1, k_pad), 2, t_pad)
  gy = _util.pad_to(_util.pad_to(gy, 1, t_pad), 2, m_pad)
  grid = (g, k_pad // cfg.block_k, m_pad // cfg.block_m)
  kernel = functools.partial(_input_grad_kernel, mode=mode,
                             block_t=cfg.block_t,
                             n_chunks=t_pad // cfg.block_t)
  dp = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((g, k_pad, m_pad), _F32),
      grid=grid,
      in_specs=[
          pl.BlockSpec((None, cfg.block_k, cfg.block_m),
                       lambda gi, i, j: (gi, i, j)),
          pl.BlockSpec((None, cfg.block_k, t_pad), lambda gi, i, j: (gi, i, 0)),
          pl.BlockSpec((None, t_pad, cfg.block_m), lambda gi, i, j: (gi, 0, j)),
      ],
      out_specs=pl.BlockSpec((None, cfg.block_k, cfg.block_m),
                             lambda gi, i, j: (gi, i, j)),
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps,
                                           num_stages=cfg.num_stages),
      cost_estimate=pl.CostEstimate(
          flops=5 * g * k_pad * m_pad * t_pad, transcendentals=0,
          bytes_accessed=(p.size * p.dtype.itemsize +
                          gy.size * gy.dtype.itemsize * grid[1] +
                          w.size * w.dtype.itemsize * grid[2] +
                          4 * g * k_pad * m_pad)),
      interpret=interpret,
      name='adder_l1_input_grad_triton',
  )(p, w, gy)
  return dp[:, :k, :m]
