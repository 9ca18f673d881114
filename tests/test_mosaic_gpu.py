"""The Mosaic GPU port's feasibility probe (jax >= 0.12; docs/mosaic_gpu.md).

jax deprecates the Pallas Triton backend that the GPU kernels use. This file
holds the smallest l1 kernel written for Mosaic GPU (Pallas ``plgpu.kernel``):
the forward pass of ``adder_dense`` on 64x64 output tiles, its operands
copied to shared memory with TMA and the ``|x - w|`` sum accumulated in
registers in the WGMMA layout. Two facts are checked from a CPU host, which
is everything a machine without a GPU can check:

* it computes ``-sum_k |x_k - w_k|`` exactly (Mosaic GPU's interpreter,
  against float64 numpy written from the paper's equation);
* ``jax.export`` lowers it for ``cuda`` (no GPU, no abstract device, no
  disabled safety check: its custom call ``mosaic_gpu_v2`` is one jax
  serialises as stable).

On jax 0.10.2 the Mosaic GPU API differs (``plgpu.load`` takes an index,
there is no ``InterpretGPUParams``): the tests are skipped there.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

pytestmark = pytest.mark.skipif(
    not hasattr(plgpu, 'InterpretGPUParams'),
    reason='the Mosaic GPU API of jax >= 0.12 (this jax: '
    f'{jax.__version__})')

TILE = 64  # output rows and columns per block (one warpgroup's WGMMA tile)


def adder_dense_mgpu(x, w, *, interpret: bool = False):
  """``-sum_k |x[m, k] - w[k, n]|`` with a Mosaic GPU kernel.

  ``M`` and ``N`` must be multiples of :data:`TILE`; ``K`` small enough for
  the ``(K, TILE)`` operand tiles to sit in shared memory.
  """
  m, k = x.shape
  n = w.shape[1]
  assert m % TILE == 0 and n % TILE == 0, (x.shape, w.shape)
  rows = plgpu.Layout.WGMMA.reduce(1)   # a (TILE,) vector along the rows
  cols = plgpu.Layout.WGMMA.reduce(0)   # a (TILE,) vector along the columns

  def body(xt_gmem, w_gmem, o_gmem, xt_smem, w_smem, o_smem, barriers):
    i = jax.lax.axis_index('m')
    j = jax.lax.axis_index('n')
    # x is passed transposed: both operand tiles are read one contiguous
    # row at a time (a column of a swizzled tile cannot be loaded).
    plgpu.copy_gmem_to_smem(xt_gmem.at[:, pl.ds(i * TILE, TILE)], xt_smem,
                            barriers.at[0])
    plgpu.copy_gmem_to_smem(w_gmem.at[:, pl.ds(j * TILE, TILE)], w_smem,
                            barriers.at[1])
    plgpu.barrier_wait(barriers.at[0])
    plgpu.barrier_wait(barriers.at[1])

    def step(kk, acc):
      xk = plgpu.load(xt_smem.at[kk, :], layout=rows)
      wk = plgpu.load(w_smem.at[kk, :], layout=cols)
      d = (jax.lax.broadcast_in_dim(xk, (TILE, TILE), (0,)) -
           jax.lax.broadcast_in_dim(wk, (TILE, TILE), (1,)))
      return acc + jnp.abs(d)

    acc = plgpu.layout_cast(jnp.zeros((TILE, TILE), jnp.float32),
                            plgpu.Layout.WGMMA)
    o_smem[...] = -jax.lax.fori_loop(0, k, step, acc)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(
        o_smem, o_gmem.at[pl.ds(i * TILE, TILE), pl.ds(j * TILE, TILE)])
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((m, n), jnp.float32),
      scratch_types=[plgpu.SMEM((k, TILE), jnp.float32),
                     plgpu.SMEM((k, TILE), jnp.float32),
                     plgpu.SMEM((TILE, TILE), jnp.float32),
                     plgpu.Barrier(num_arrivals=1, num_barriers=2)],
      grid=(m // TILE, n // TILE), grid_names=('m', 'n'),
      interpret=plgpu.InterpretGPUParams() if interpret else None)(x.T, w)


@pytest.mark.parametrize('m,k,n', [(64, 9, 64), (128, 32, 192)])
def test_interpreted_kernel_is_the_l1_forward(m, k, n):
  rng = np.random.default_rng(m + k + n)
  x = rng.normal(size=(m, k)).astype(np.float32)
  w = rng.normal(size=(k, n)).astype(np.float32)
  want = -np.abs(x.astype(np.float64)[:, :, None] -
                 w.astype(np.float64)[None]).sum(1)
  got = jax.jit(lambda a, b: adder_dense_mgpu(a, b, interpret=True))(x, w)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-5)


def test_kernel_exports_for_cuda_from_a_cpu_host():
  exported = jax.export.export(jax.jit(adder_dense_mgpu),
                               platforms=('cuda',))(
      jax.ShapeDtypeStruct((128, 32), jnp.float32),
      jax.ShapeDtypeStruct((32, 128), jnp.float32))
  text = exported.mlir_module()
  assert 'stablehlo.custom_call @mosaic_gpu' in text
  assert exported.platforms == ('cuda',)
  assert not exported.disabled_safety_checks
